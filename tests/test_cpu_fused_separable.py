"""Kinds "ht2" and "tt_tucker" on the fused CPU path (HSV_CPU_IMPL=fused): the first
1x1 and the kh x 1 conv as oneDNN convs, the 1 x kw conv and the last 1x1 in the fused
svd kernel (separable_two_pass.cpp).

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
from test_cpu_fused import (ISAS, LAYOUT_IDS, LAYOUT_SHAPES, TOL32, _make_input, _rel_err,
                             assert_composite_does_not_pack, assert_errors_match_composite,
                             assert_fused_matches_composite, assert_impls_agree_in_autograd, check_kind_against_dense,
                             cpu_env)
from test_op import SHAPES

import hsvkernels
from hsvkernels import _extension

INFO = hsvkernels.build_info()
pytestmark = pytest.mark.skipif(not INFO.get("extension"), reason="needs the native extension")
KINDS = ["ht2", "tt_tucker"]


def _check(kind, spec, layout, isa, threads, with_bias=True):
    check_kind_against_dense(kind, spec, layout, isa, threads, with_bias, packed_factors=2)  # G2 and U3


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("spec", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_separable_matches_dense(kind, spec, isa, threads):
    _check(kind, spec, "contiguous", isa, threads)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous", "channels_last_noncontiguous"])
@pytest.mark.parametrize("spec", LAYOUT_SHAPES, ids=LAYOUT_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_fused_separable_layouts(kind, spec, layout, isa):
    for threads in (1, 2):
        _check(kind, spec, layout, isa, threads, with_bias=threads == 1)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_g2_is_reused_across_calls(kind):
    # G2 is packed against the layer's own tensor, not a per-call view: a second
    # call packs nothing new, and an in-place update of G2 is seen.
    fact = CASES[kind].random((12, 8, 3, 3), dtype=torch.float32)
    x = torch.randn(2, 8, 9, 9)
    with cpu_env("fused"):
        _extension._C.clear_packed_cache()
        hsvkernels.conv2d(x, fact, None, 1, 1, 1)
        first = _extension._C.packed_cache_size()
        hsvkernels.conv2d(x, fact, None, 1, 1, 1)
        assert first == 2 and _extension._C.packed_cache_size() == 2
        with torch.no_grad():
            fact.factors[2].mul_(-1.5)
        y = hsvkernels.conv2d(x, fact, None, 1, 1, 1)
    truth = F.conv2d(x.double(), fact.to(torch.float64).to_dense(), None, 1, 1, 1)
    assert _rel_err(y, truth) <= TOL32


def test_composite_does_not_pack():
    assert_composite_does_not_pack("ht2")


@pytest.mark.parametrize("kind", KINDS)
def test_fused_separable_autograd_and_auto(kind):
    fact = CASES[kind].random((12, 8, 3, 3), dtype=torch.float32)
    assert_impls_agree_in_autograd(torch.randn(2, 8, 9, 7), fact.factors, kind, [2, 1], [1, 1], [1, 1])


@pytest.mark.parametrize("kind", KINDS)
def test_fused_separable_argument_errors_match_composite(kind):
    fact = CASES[kind].random((12, 8, 3, 3), dtype=torch.float32)
    assert_errors_match_composite(fact.factors, kind, cin=8)


@st.composite
def separable_specs(draw):
    n, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw) = draw_conv_geometry(draw)
    cin, cout = draw(st.integers(1, 20)), draw(st.integers(1, 40))
    r1, r13, r3 = (draw(st.integers(1, 24)) for _ in range(3))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "noncontiguous", "channels_last_noncontiguous"]))
    return (draw(st.sampled_from(KINDS)), n, cin, cout, r1, r13, r3, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw),
            layout, draw(st.sampled_from(ISAS)), draw(st.sampled_from([1, 2])), draw(st.booleans()))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(separable_specs())
def test_fused_separable_vs_composite_random_shapes(spec):
    kind, n, cin, cout, r1, r13, r3, h, w, kh, kw, stride, padding, dilation, layout, isa, threads, with_bias = spec
    factors = [torch.randn(r1, cin) / cin ** 0.5, torch.randn(r13, r1, kh) / (r1 * kh) ** 0.5,
               torch.randn(r3, r13, kw) / (r13 * kw) ** 0.5, torch.randn(cout, r3) / r3 ** 0.5]
    x = _make_input(n, cin, h, w, layout)
    args = (factors, torch.randn(cout) if with_bias else None, list(stride), list(padding), list(dilation), 1, kind)
    assert_fused_matches_composite(x, args, isa, threads)
