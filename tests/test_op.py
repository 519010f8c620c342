"""torch.ops.hsv.conv2d against F.conv2d on the dense kernel and against the reference path."""
import pytest
import torch
import torch.nn.functional as F
from factories import CASES, KINDS

import hsvkernels
from hsvkernels import reference

# (N, Cin, Cout, H, W, kh, kw, stride, padding, dilation)
SHAPES = [
    (2, 8, 16, 9, 11, 3, 3, 1, 1, 1),     # odd H and W
    (2, 8, 16, 10, 10, 3, 3, 2, 1, 1),    # stride 2
    (1, 8, 8, 9, 9, 3, 3, 1, 0, 1),       # no padding, batch 1
    (2, 8, 16, 12, 13, 3, 3, 1, 2, 2),    # dilation 2
    (2, 12, 8, 9, 7, 3, 1, 1, (1, 0), 1),  # 3x1
    (2, 12, 8, 7, 9, 1, 3, 1, (0, 1), 1),  # 1x3
    (2, 8, 12, 11, 11, 5, 5, 1, 2, 1),    # 5x5
    (1, 4, 16, 15, 17, 7, 7, 2, 3, 1),    # 7x7 stride 2, like a stem
    (2, 16, 32, 8, 8, 1, 1, 1, 0, 1),     # 1x1
    (2, 16, 8, 9, 9, 1, 1, 2, 0, 1),      # 1x1 stride 2
    (0, 8, 16, 9, 9, 3, 3, 1, 1, 1),      # batch 0
    (3, 6, 10, 6, 5, 2, 3, (2, 1), (0, 1), (1, 2)),  # even kernel, mixed stride/dilation
]
TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _case(kind, spec, dtype, layout="contiguous"):
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
    shape = (cout, cin, kh, kw)
    if not CASES[kind].supports(shape):
        pytest.skip("kind %s cannot represent shape %s" % (kind, shape))
    fact = CASES[kind].random(shape, dtype=torch.float64)
    x = torch.randn(n, cin, h, w, dtype=torch.float64)
    bias = torch.randn(cout, dtype=torch.float64)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontiguous":
        x = torch.randn(n, cin, h, 2 * w, dtype=dtype)[..., ::2]
        assert not x.is_contiguous()
    return fact, x, bias, stride, padding, dilation


def _relative_max_error(y, ref):
    if ref.numel() == 0:
        return 0.0
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _dense_truth(fact, x, bias, stride, padding, dilation):
    return F.conv2d(x.double(), fact.to_dense().double(), bias.double(), stride, padding, dilation)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_op_matches_dense_and_reference(kind, spec, dtype):
    fact, x, bias, stride, padding, dilation = _case(kind, spec, dtype)
    truth = _dense_truth(fact, x, bias, stride, padding, dilation)
    fact_d = fact.to(dtype)
    y = hsvkernels.conv2d(x, fact_d, bias.to(dtype), stride, padding, dilation)
    y_ref = reference.conv2d(x, fact_d, bias.to(dtype), stride, padding, dilation)
    assert y.shape == truth.shape and y.dtype == dtype
    assert _relative_max_error(y, truth) <= TOL[dtype]
    assert _relative_max_error(y_ref, truth) <= TOL[dtype]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize("spec", [SHAPES[0], SHAPES[1], SHAPES[8]], ids=["3x3", "stride2", "1x1"])
def test_op_layouts(kind, layout, spec):
    fact, x, bias, stride, padding, dilation = _case(kind, spec, torch.float32, layout)
    truth = _dense_truth(fact, x, bias, stride, padding, dilation)
    y = hsvkernels.conv2d(x, fact.to(torch.float32), bias.float(), stride, padding, dilation)
    assert _relative_max_error(y, truth) <= TOL[torch.float32]
    expected = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected)


@pytest.mark.parametrize("kind", KINDS)
def test_full_rank_is_exact_float64(kind):
    for cout, cin, kh, kw in [(16, 8, 3, 3), (12, 16, 1, 1), (8, 8, 5, 3)]:
        if not CASES[kind].supports((cout, cin, kh, kw)):
            continue
        weight = torch.randn(cout, cin, kh, kw, dtype=torch.float64)
        fact = CASES[kind].full_rank(weight)
        assert (fact.to_dense() - weight).abs().max().item() < 1e-12 * weight.abs().max().item() * 10
        x = torch.randn(2, cin, 11, 9, dtype=torch.float64)
        y = hsvkernels.conv2d(x, fact, None, 2, 1, (1, 2))
        truth = F.conv2d(x, weight, None, 2, 1, (1, 2))
        assert (y - truth).abs().max().item() < 1e-11


@pytest.mark.parametrize("kind", KINDS)
def test_op_without_bias_and_pairs(kind):
    fact, x, _, _, _, _ = _case(kind, SHAPES[0], torch.float64)
    y = torch.ops.hsv.conv2d(x, fact.factors, None, [1, 1], [1, 1], [1, 1], 1, kind)
    truth = F.conv2d(x, fact.to_dense(), None, 1, 1)
    assert (y - truth).abs().max().item() < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_inputs_each_call(kind):
    # The op must not cache results across calls with new data in the same shapes.
    fact, x, bias, stride, padding, dilation = _case(kind, SHAPES[0], torch.float64)
    y1 = hsvkernels.conv2d(x, fact, bias, stride, padding, dilation)
    x2 = torch.randn_like(x)
    y2 = hsvkernels.conv2d(x2, fact, bias, stride, padding, dilation)
    assert (y2 - _dense_truth(fact, x2, bias, stride, padding, dilation)).abs().max() < 1e-12
    assert not torch.allclose(y1, y2)
