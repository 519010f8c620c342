"""Kind "tucker2" on the fused CPU path (HSV_CPU_IMPL=fused): its first 1x1 as one
pass, the core conv and the last 1x1 in the fused svd kernel (tucker2_two_pass.cpp).

Ground truth is F.conv2d in float64 on the dense weight rebuilt from the factors;
that the fused kernel really ran is read off the packed-factor cache, which only the
fused kernel fills.
"""
import pytest
import torch
from factories import CASES, draw_conv_geometry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cpu_fused import (ISAS, LAYOUT_IDS, LAYOUT_SHAPES, _make_input, assert_composite_does_not_pack,
                             assert_errors_match_composite, assert_fused_matches_composite,
                             assert_impls_agree_in_autograd, check_kind_against_dense)
from test_op import SHAPES

import hsvkernels

INFO = hsvkernels.build_info()
pytestmark = pytest.mark.skipif(not INFO.get("extension"), reason="needs the native extension")


def _check(spec, layout, isa, threads, with_bias=True):
    check_kind_against_dense("tucker2", spec, layout, isa, threads, with_bias, packed_factors=2)  # core and U_T


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
    assert_composite_does_not_pack("tucker2")


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
