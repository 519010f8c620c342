"""Kind "kcp" (6 factors and the 5-factor merged form) on the fused CPU path
(HSV_CPU_IMPL=fused, csrc/ops/cpu/kcp_fused.cpp), under every ISA path this CPU runs.

Ground truth is F.conv2d in float64 on the dense weight rebuilt from the factors;
hypothesis-drawn shapes and ranks compare fused against the composite chain. That
the fused kernel really ran is read off the packed-factor cache, which only the
fused kernel fills (four entries: as, ah, aw, and at or M).
"""
import pytest
import torch
import torch.nn.functional as F
from factories import CASES, draw_conv_geometry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cpu_fused import (ISAS, LAYOUT_IDS, LAYOUT_SHAPES, TOL32, _expected_format, _make_input, _rel_err,
                            assert_composite_does_not_pack, assert_errors_match_composite,
                            assert_fused_matches_composite, assert_impls_agree_in_autograd, cpu_env, packed_after)
from test_op import SHAPES

import hsvkernels
from hsvkernels.formats.kcp import KCP

INFO = hsvkernels.build_info()
pytestmark = pytest.mark.skipif(not INFO.get("extension"), reason="needs the native extension")
PACKED = 4


def _random(spec, merged):
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
    return CASES["kcp"].random((cout, cin, kh, kw), dtype=torch.float64, merged=merged)


def _check(spec, layout, merged=False, with_bias=True, fact=None):
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
    fact = fact if fact is not None else _random(spec, merged)
    x = _make_input(n, cin, h, w, layout)
    bias = torch.randn(cout, dtype=torch.float64) if with_bias else None
    truth = F.conv2d(x.double(), fact.to_dense(), bias, stride, padding, dilation)
    y, packed = packed_after(lambda: hsvkernels.conv2d(x, fact.to(torch.float32), None if bias is None else bias.float(),
                                                       stride, padding, dilation))
    assert y.dtype == torch.float32 and y.shape == truth.shape
    assert y.is_contiguous(memory_format=_expected_format(x))
    if n > 0:
        assert packed == PACKED, "the fused kcp kernel did not run"
    assert _rel_err(y, truth) <= TOL32


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("merged", [False, True], ids=["six", "merged"])
@pytest.mark.parametrize("spec", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
def test_fused_kcp_matches_dense(spec, merged, isa, threads):
    with cpu_env("fused", isa, threads):
        _check(spec, "contiguous", merged)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("merged", [False, True], ids=["six", "merged"])
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous", "channels_last_noncontiguous"])
@pytest.mark.parametrize("spec", LAYOUT_SHAPES, ids=LAYOUT_IDS)
def test_fused_kcp_layouts(spec, layout, merged, isa):
    for threads in (1, 2):
        with cpu_env("fused", isa, threads):
            _check(spec, layout, merged, with_bias=threads == 1)


def _kcp(cout, cin, kh, kw, split, rank, merged=False):
    from hsvkernels.decompose import kcp
    from hsvkernels.factorization import Factorization
    shapes = kcp.factor_shapes((cout, cin, kh, kw), split, rank, merged)
    factors = [torch.randn(s, dtype=torch.float64) / s[-1] ** 0.5 for s in shapes]
    return Factorization("kcp", factors, (cout, cin, kh, kw))


# Sizes that cross the microkernels' edges: Q*N not a multiple of MR, R and T2 past
# one NR panel and not a multiple of it, S2 past one panel, T1 past MR; and layer
# sizes big enough (>= 2^20 MACs) to run on several threads, with batch 1 (an image
# cut into bands, each recomputing its halo rows) and batch 3 (whole images).
PANEL_CASES = [
    # (spec, split (T1, S1), rank (N, R, Q))
    ((2, 40, 66, 9, 10, 3, 3, 1, 1, 1), (3, 2), (7, 37, 2)),      # QN 14, R 37, S2 20, T2 22
    ((2, 36, 50, 8, 9, 3, 3, 2, 1, 1), (25, 1), (5, 9, 1)),       # S2 36 > NR/2, T1 25 > MR, T2 2
    ((1, 64, 64, 28, 28, 3, 3, 1, 1, 1), (4, 4), (12, 16, 1)),    # threads: batch 1 in bands
    ((3, 64, 128, 20, 20, 3, 3, 2, 1, 1), (8, 8), (16, 24, 2)),   # threads: whole images, stride 2
    ((1, 96, 160, 13, 14, 1, 1, 2, 0, 1), (16, 4), (8, 12, 2)),   # 1x1 stride 2: a quarter of the input
    ((2, 24, 36, 11, 13, 3, 2, (2, 3), (1, 0), (2, 1)), (6, 3), (4, 5, 2)),  # stage 3 not affine in ox
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("merged", [False, True], ids=["six", "merged"])
@pytest.mark.parametrize("case", PANEL_CASES, ids=[str(i) for i in range(len(PANEL_CASES))])
def test_fused_kcp_panels_and_threads(case, merged, isa):
    spec, split, rank = case
    n, cin, cout, h, w, kh, kw = spec[:7]
    fact = _kcp(cout, cin, kh, kw, split, rank, merged)
    for threads in (1, 2, 3):
        for layout in ("contiguous", "channels_last"):
            with cpu_env("fused", isa, threads):
                _check(spec, layout, merged, with_bias=layout == "contiguous", fact=fact)


def test_composite_does_not_pack():
    assert_composite_does_not_pack("kcp")


def test_fused_kcp_follows_factor_updates():
    # the packed-factor cache must see in-place updates (version counter)
    fact = _kcp(24, 16, 3, 3, (4, 4), (3, 4, 2)).to(torch.float32)
    x = torch.randn(2, 16, 9, 9)
    with cpu_env("fused"):
        y0 = hsvkernels.conv2d(x, fact, None, 1, 1)
        for f in fact.factors:
            with torch.no_grad():
                f.mul_(1.5)
        y1 = hsvkernels.conv2d(x, fact, None, 1, 1)
    truth = F.conv2d(x.double(), KCP().to_dense([f.double() for f in fact.factors]), None, 1, 1)
    assert _rel_err(y1, truth) <= TOL32
    assert _rel_err(y1, y0 * 1.5 ** 6) <= TOL32


def test_fused_kcp_autograd_and_auto():
    fact = _kcp(12, 8, 3, 3, (3, 2), (3, 4, 2)).to(torch.float32)
    assert_impls_agree_in_autograd(torch.randn(2, 8, 9, 7), fact.factors, "kcp", [2, 1], [1, 1], [1, 1])


def test_fused_kcp_argument_errors_match_composite():
    fact = _kcp(12, 8, 3, 3, (3, 2), (3, 4, 2)).to(torch.float32)
    assert_errors_match_composite(fact.factors, "kcp", cin=8)


def _divisors(c):
    return [d for d in range(1, c + 1) if c % d == 0]


@st.composite
def kcp_specs(draw):
    n, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw) = draw_conv_geometry(draw)
    cin, cout = draw(st.integers(1, 24)), draw(st.integers(1, 40))
    t1, s1 = draw(st.sampled_from(_divisors(cout))), draw(st.sampled_from(_divisors(cin)))
    rank = (draw(st.integers(1, 12)), draw(st.integers(1, 20)), draw(st.integers(1, 4)))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "noncontiguous", "channels_last_noncontiguous"]))
    return ((n, cin, cout, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw)), (t1, s1), rank, draw(st.booleans()), layout,
            draw(st.sampled_from(ISAS)), draw(st.sampled_from([1, 2])), draw(st.booleans()))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kcp_specs())
def test_fused_kcp_vs_composite_random_shapes(spec):
    (n, cin, cout, h, w, kh, kw, stride, padding, dilation), split, rank, merged, layout, isa, threads, with_bias = spec
    fact = _kcp(cout, cin, kh, kw, split, rank, merged).to(torch.float32)
    x = _make_input(n, cin, h, w, layout)
    args = (list(fact.factors), torch.randn(cout) if with_bias else None, list(stride), list(padding), list(dilation),
            1, "kcp")
    assert_fused_matches_composite(x, args, isa, threads)
