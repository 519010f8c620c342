"""The fused CPU forward of kind "hsv" (HSV_CPU_IMPL=fused), levels 1 and 2, under every ISA path this CPU runs.

Ground truth is F.conv2d in float64 on the dense weight rebuilt from the same
factors; hypothesis-drawn shapes, splits and levels compare fused against the
composite chain. Also: the packed-factor cache sees in-place factor updates.
"""
import pytest
import torch
from factories import draw_conv_geometry
from hsv_case import LAYOUTS, random_factors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cpu_fused import (ISAS, LAYOUT_IDS, LAYOUT_SHAPES, TOL32, _make_input, _rel_err,
                             assert_fused_matches_composite, cpu_env)
from test_cpu_fused import _check_against_dense as check_fact_against_dense
from test_op import SHAPES

import hsvkernels
from hsvkernels import Factorization

INFO = hsvkernels.build_info()
pytestmark = pytest.mark.skipif(not INFO.get("extension"), reason="needs the native extension")


def _check_against_dense(spec, layout="contiguous", level="level1", rank=3, with_bias=True, fact=None):
    if fact is None:
        n, cin, cout, h, w, kh, kw = spec[:7]
        fact = random_factors((cout, cin, kh, kw), dtype=torch.float64, layout=level, rank=rank)
    check_fact_against_dense(spec, layout, with_bias, fact)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("spec", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
def test_fused_hsv_matches_dense(spec, isa, threads):
    with cpu_env("fused", isa, threads):
        _check_against_dense(spec)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous", "channels_last_noncontiguous"])
@pytest.mark.parametrize("spec", LAYOUT_SHAPES, ids=LAYOUT_IDS)
def test_fused_hsv_layouts(spec, layout, isa, threads):
    with cpu_env("fused", isa, threads):
        _check_against_dense(spec, layout)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("level", [k for k in LAYOUTS if k != "level1"])
@pytest.mark.parametrize("spec", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
def test_fused_hsv_level2(spec, level, isa):
    for threads in (1, 2):
        with cpu_env("fused", isa, threads):
            _check_against_dense(spec, "contiguous", level)
            _check_against_dense(spec, "channels_last", level, with_bias=False)


def _factors(T1, S1, T2, S2, P, kh, kw, q1=None, q2=None):
    def rnd(*size, fan):
        return torch.randn(*size, dtype=torch.float64) / fan ** 0.5
    fs = [rnd(P, T2, S2, kh, kw, fan=S2 * kh * kw)] if q1 is None else [
        rnd(q1, S2, kh, kw, fan=S2 * kh * kw), rnd(P, T2, q1, fan=q1)]
    fs += [rnd(T1, S1, P, fan=S1 * P)] if q2 is None else [rnd(q2, S1, P, fan=S1 * P), rnd(T1, q2, fan=q2)]
    return Factorization("hsv", fs, (T1 * T2, S1 * S2, kh, kw))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("sizes", [
    (35, 1, 2, 40, 20, None, None),   # P*T2 = 40, T1 = 35: narrow/edge panels, SVD-like S1 = 1
    (32, 3, 3, 16, 11, None, None),   # S1 = 3: the (s1, p) contraction gathered across groups
    (70, 2, 1, 24, 33, 40, 50),       # level 2 with q1, q2 past one panel
    (8, 4, 5, 6, 7, None, 9),         # T2 = 5 interleaved output channels
    (20, 1, 1, 16, 48, None, None),   # P = 48: AVX-512's 8 x 48 kernel, row blocks of 8 in 24-pixel tiles
    (12, 2, 2, 10, 9, 36, None),      # level 2, q1 = 36: the B1 conv on the 8 x 48 kernel, padded to 48
    (10, 1, 1, 12, 21, None, None),   # P = 21: AVX2's 4 x 24 kernel (12-pixel tiles), AVX-512's narrow one
], ids=["svd-like", "groups", "level2", "t2", "three-wide", "three-wide-level2", "three-wide-avx2"])
def test_fused_hsv_panel_widths(sizes, isa):
    # Factor widths past several NR panels, pixel counts that are no multiple of
    # the tile, batch 1 and 3, NCHW and NHWC, 1 to 3 threads.
    T1, S1, T2, S2, P, q1, q2 = sizes
    fact = _factors(T1, S1, T2, S2, P, 3, 3, q1, q2)
    for threads in (1, 2, 3):
        with cpu_env("fused", isa, threads):
            for n, h, w, stride in ((1, 13, 11, 1), (3, 12, 17, 2)):
                spec = (n, S1 * S2, T1 * T2, h, w, 3, 3, stride, 1, 1)
                _check_against_dense(spec, "contiguous", fact=fact)
                _check_against_dense(spec, "channels_last", fact=fact, with_bias=False)


def test_fused_hsv_repacks_after_inplace_factor_update():
    fact = _factors(16, 2, 2, 8, 5, 3, 3)
    factors = [f.float().clone() for f in fact.factors]
    x = torch.randn(2, 16, 9, 9)
    args = ([1, 1], [1, 1], [1, 1], 1, "hsv")
    with cpu_env("fused"):
        y1 = torch.ops.hsv.conv2d(x, factors, None, *args)
        assert hsvkernels._C.packed_cache_size() >= 2
        assert torch.equal(torch.ops.hsv.conv2d(x, factors, None, *args), y1)  # cached packs, same result
        with torch.no_grad():
            factors[0].mul_(2.0)  # bumps the version counter
            factors[1][0].neg_()  # an in-place write through a view bumps it too
        y2 = torch.ops.hsv.conv2d(x, factors, None, *args)
    with cpu_env("composite"):
        ref = torch.ops.hsv.conv2d(x, factors, None, *args)
    assert _rel_err(y2, ref) <= TOL32 and _rel_err(y2, y1) > 0.1
    assert hsvkernels._C.clear_packed_cache() >= 2
    assert hsvkernels._C.packed_cache_size() == 0


def test_fused_hsv_nchw_bias_column_follows_inplace_bias_update():
    # NCHW output adds the bias as one more K step of the last GEMM (a copy of A with the bias as a column):
    # an in-place bias update must reach the next call, and it adds exactly to every output.
    fact = _factors(8, 2, 2, 6, 4, 3, 3)
    factors = [f.float().clone() for f in fact.factors]
    bias = torch.randn(16)
    x = torch.randn(2, 12, 7, 9)
    args = ([1, 1], [1, 1], [1, 1], 1, "hsv")
    with cpu_env("fused"):
        y1 = torch.ops.hsv.conv2d(x, factors, bias, *args)
        assert torch.equal(torch.ops.hsv.conv2d(x, factors, bias, *args), y1)
        with torch.no_grad():
            bias.add_(1.0)
        y2 = torch.ops.hsv.conv2d(x, factors, bias, *args)
    with cpu_env("composite"):
        ref = torch.ops.hsv.conv2d(x, factors, bias, *args)
    assert _rel_err(y2, ref) <= TOL32
    torch.testing.assert_close(y2 - y1, torch.ones_like(y1), rtol=0, atol=1e-5)


def test_fused_hsv_inference_mode_factors():
    fact = _factors(12, 2, 2, 6, 4, 3, 3)
    with torch.inference_mode():
        factors = [f.float().clone() for f in fact.factors]  # inference tensors: no version counter
        assert all(f.is_inference() for f in factors)
        x = torch.randn(1, 12, 7, 8)
        with cpu_env("fused"):
            y = torch.ops.hsv.conv2d(x, factors, None, [1, 1], [1, 1], [1, 1], 1, "hsv")
        with cpu_env("composite"):
            ref = torch.ops.hsv.conv2d(x, factors, None, [1, 1], [1, 1], [1, 1], 1, "hsv")
    assert _rel_err(y, ref) <= TOL32


def test_fused_hsv_autograd_stays_composite():
    fact = _factors(6, 2, 2, 4, 3, 3, 3, q1=5)
    x = torch.randn(2, 8, 7, 6, requires_grad=True)
    factors = [f.float().requires_grad_() for f in fact.factors]
    with cpu_env("fused"):
        y = torch.ops.hsv.conv2d(x, factors, None, [2, 2], [1, 1], [1, 1], 1, "hsv")
        y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    f2 = [f.detach().clone().requires_grad_() for f in factors]
    with cpu_env("composite"):
        y2 = torch.ops.hsv.conv2d(x2, f2, None, [2, 2], [1, 1], [1, 1], 1, "hsv")
        y2.square().sum().backward()
    assert _rel_err(y, y2) <= TOL32 and _rel_err(x.grad, x2.grad) <= 1e-4
    for a, b in zip(factors, f2):
        assert _rel_err(a.grad, b.grad) <= 1e-4


def _divisor(draw, n):
    return draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))


@st.composite
def hsv_specs(draw):
    n, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw) = draw_conv_geometry(draw)
    cin, cout = draw(st.integers(1, 24)), draw(st.integers(1, 48))
    S1, T2 = _divisor(draw, cin), _divisor(draw, cout)
    P = draw(st.integers(1, 20))
    q1 = draw(st.one_of(st.none(), st.integers(1, 20)))
    q2 = draw(st.one_of(st.none(), st.integers(1, 20)))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "noncontiguous", "channels_last_noncontiguous"]))
    isa = draw(st.sampled_from(ISAS))
    threads = draw(st.sampled_from([1, 2]))
    with_bias = draw(st.booleans())
    return (n, cout // T2, S1, T2, cin // S1, P, q1, q2, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw), layout, isa,
            threads, with_bias)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hsv_specs())
def test_fused_hsv_vs_composite_random_shapes(spec):
    n, T1, S1, T2, S2, P, q1, q2, h, w, kh, kw, stride, padding, dilation, layout, isa, threads, with_bias = spec
    factors = [f.float() for f in _factors(T1, S1, T2, S2, P, kh, kw, q1, q2).factors]
    x = _make_input(n, S1 * S2, h, w, layout)
    bias = torch.randn(T1 * T2) if with_bias else None
    args = (factors, bias, list(stride), list(padding), list(dilation), 1, "hsv")
    assert_fused_matches_composite(x, args, isa, threads)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("sizes", [(16, 1, 2, 12, 5), (8, 3, 2, 4, 6)], ids=["S1=1", "S1=3"])
def test_auto_times_once_per_configuration_and_matches_dense(sizes, layout):
    # auto times fused against composite on the first call of each configuration
    # and reuses the choice; whichever it keeps must give the right answer.
    from hsvkernels import _C
    T1, S1, T2, S2, P = sizes
    fact = _factors(T1, S1, T2, S2, P, 3, 3)
    _C.clear_auto_choices()
    with cpu_env("auto"):
        for n, h in ((1, 9), (2, 50)):
            _check_against_dense((n, S1 * S2, T1 * T2, h, h, 3, 3, 1, 1, 1), layout, fact=fact)
        choices = _C.auto_choices()
        assert len(choices) == 2 and set(choices.values()) <= {"fused", "composite"}
        assert all(key.startswith("cpu hsv ") for key in choices)
        # The same configurations again: decided already, nothing new is timed.
        for n, h in ((1, 9), (2, 50)):
            _check_against_dense((n, S1 * S2, T1 * T2, h, h, 3, 3, 1, 1, 1), layout, fact=fact)
        assert _C.auto_choices() == choices
    assert _C.clear_auto_choices() == 2 and _C.auto_choices() == {}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_fused_hsv_staged_nchw_patches(layout, isa):
    # NCHW input with a wide conv GEMM (P*T2 = 40, 3x3: conv N x taps >= 256)
    # is staged per tile into NHWC patches: tiles spanning several small
    # images, images taller than a tile, padding, dilation, 1 and 2 threads.
    fact = _factors(12, 2, 4, 10, 10, 3, 3)
    for threads in (1, 2):
        with cpu_env("fused", isa, threads):
            for n, h, w, padding, dilation in ((5, 5, 6, 1, 1), (2, 23, 9, 2, 2), (1, 4, 30, 0, 1)):
                _check_against_dense((n, 20, 48, h, w, 3, 3, 1, padding, dilation), layout, fact=fact)
