"""Kind "tucker2" on the fused CPU path (HSV_CPU_IMPL=fused): its first 1x1 as one
pass, the core conv and the last 1x1 in the fused svd kernel (tucker2_two_pass.cpp).

Ground truth is F.conv2d in float64 on the dense weight rebuilt from the factors;
that the fused kernel really ran is read off the packed-factor cache, which only the
fused kernel fills.
"""
import pytest
import torch
import torch.nn.functional as F
from factories import CASES, draw_conv_geometry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cpu_fused import (ISAS, LAYOUT_IDS, LAYOUT_SHAPES, TOL32, _expected_format, _make_input, _rel_err,
                             assert_errors_match_composite, assert_fused_matches_composite,
                             assert_impls_agree_in_autograd, cpu_env)
from test_op import SHAPES

import hsvkernels
from hsvkernels import _extension

INFO = hsvkernels.build_info()
pytestmark = pytest.mark.skipif(not INFO.get("extension"), reason="needs the native extension")


def _packed_after(fn):
    _extension._C.clear_packed_cache()
    out = fn()
    return out, _extension._C.packed_cache_size()


def _check(spec, layout, isa, threads, with_bias=True):
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
    fact = CASES["tucker2"].random((cout, cin, kh, kw), dtype=torch.float64)
    x = _make_input(n, cin, h, w, layout)
    bias = torch.randn(cout, dtype=torch.float64) if with_bias else None
    truth = F.conv2d(x.double(), fact.to_dense(), bias, stride, padding, dilation)
    with cpu_env("fused", isa, threads):
        y, packed = _packed_after(lambda: hsvkernels.conv2d(x, fact.to(torch.float32),
                                                           None if bias is None else bias.float(), stride,
                                                           padding, dilation))
    assert y.dtype == torch.float32 and y.shape == truth.shape
    assert y.is_contiguous(memory_format=_expected_format(x))
    if n > 0:
        assert packed == 2, "the fused kernel did not run (core and U_T are packed only there)"
    assert _rel_err(y, truth) <= TOL32


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("spec", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
def test_fused_tucker2_matches_dense(spec, isa, threads):
    _check(spec, "contiguous", isa, threads)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous", "channels_last_noncontiguous"])
@pytest.mark.parametrize("spec", LAYOUT_SHAPES, ids=LAYOUT_IDS)
def test_fused_tucker2_layouts(spec, layout, isa):
    for threads in (1, 2):
        _check(spec, layout, isa, threads, with_bias=threads == 1)


def test_composite_does_not_pack():
    # the other side of the "fused ran" signal used above
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = SHAPES[0]
    fact = CASES["tucker2"].random((cout, cin, kh, kw), dtype=torch.float32)
    with cpu_env("composite"):
        _, packed = _packed_after(lambda: hsvkernels.conv2d(torch.randn(n, cin, h, w), fact, None, stride, padding,
                                                            dilation))
    assert packed == 0


def test_fused_tucker2_autograd_and_auto():
    fact = CASES["tucker2"].random((12, 8, 3, 3), dtype=torch.float32)
    assert_impls_agree_in_autograd(torch.randn(2, 8, 9, 7), fact.factors, "tucker2", [2, 1], [1, 1], [1, 1])


def test_fused_tucker2_argument_errors_match_composite():
    fact = CASES["tucker2"].random((12, 8, 3, 3), dtype=torch.float32)
    assert_errors_match_composite(fact.factors, "tucker2", cin=8)


@st.composite
def tucker2_specs(draw):
    n, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw) = draw_conv_geometry(draw)
    cin, cout = draw(st.integers(1, 20)), draw(st.integers(1, 40))
    rs, rt = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "noncontiguous", "channels_last_noncontiguous"]))
    return (n, cin, cout, rs, rt, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw), layout,
            draw(st.sampled_from(ISAS)), draw(st.sampled_from([1, 2])), draw(st.booleans()))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tucker2_specs())
def test_fused_tucker2_vs_composite_random_shapes(spec):
    n, cin, cout, rs, rt, h, w, kh, kw, stride, padding, dilation, layout, isa, threads, with_bias = spec
    factors = [torch.randn(rs, cin) / cin ** 0.5, torch.randn(rt, rs, kh, kw) / (rs * kh * kw) ** 0.5,
               torch.randn(cout, rt) / rt ** 0.5]
    x = _make_input(n, cin, h, w, layout)
    args = (factors, torch.randn(cout) if with_bias else None, list(stride), list(padding), list(dilation), 1,
            "tucker2")
    assert_fused_matches_composite(x, args, isa, threads)
