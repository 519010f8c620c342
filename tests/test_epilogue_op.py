"""torch.ops.hsv.conv2d_epilogue: relu(conv + residual) against F.conv2d on the dense kernel and the reference."""
import pytest
import torch
import torch.nn.functional as F
from factories import CASES, KINDS
from torch.utils.flop_counter import FlopCounterMode

import hsvkernels
from hsvkernels import reference

# (N, Cin, Cout, H, W, kh, kw, stride, padding, dilation)
SHAPES = [
    (2, 8, 16, 9, 11, 3, 3, 1, 1, 1),     # odd H and W
    (2, 8, 16, 10, 10, 3, 3, 2, 1, 1),    # stride 2
    (1, 16, 32, 8, 8, 1, 1, 1, 0, 1),     # 1x1, batch 1
    (2, 12, 8, 9, 7, 3, 1, 1, (1, 0), (2, 1)),  # 3x1, dilation
    (0, 8, 16, 9, 9, 3, 3, 1, 1, 1),      # batch 0
]
TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 3e-2}
LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        wide = torch.empty(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _case(kind, spec, dtype, layout="contiguous", residual_layout="contiguous", seed=0):
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
    shape = (cout, cin, kh, kw)
    if not CASES[kind].supports(shape):
        pytest.skip("kind %s cannot represent shape %s" % (kind, shape))
    torch.manual_seed(seed)
    fact = CASES[kind].random(shape, dtype=torch.float64)
    x = torch.randn(n, cin, h, w, dtype=torch.float64)
    bias = torch.randn(cout, dtype=torch.float64)
    dense = F.conv2d(x, fact.to_dense(), bias, stride, padding, dilation)
    residual = torch.randn_like(dense)
    return (fact, _layout(x.to(dtype), layout), bias.to(dtype), _layout(residual.to(dtype), residual_layout),
            stride, padding, dilation, dense)


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def _call(fact, x, bias, residual, stride, padding, dilation, relu):
    return torch.ops.hsv.conv2d_epilogue(x, [f.to(x.dtype) for f in fact.factors], bias, residual, _pair(stride),
                                         _pair(padding), _pair(dilation), 1, fact.kind, relu)


def _relative_max_error(y, ref):
    if ref.numel() == 0:
        return 0.0
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tail", ["add+relu", "add", "relu"])
def test_epilogue_matches_dense_and_reference(kind, spec, dtype, tail):
    fact, x, bias, residual, stride, padding, dilation, dense = _case(kind, spec, dtype)
    add, relu = "add" in tail, "relu" in tail
    truth = dense + residual.double() if add else dense
    truth = truth.relu() if relu else truth
    res = residual if add else None
    y = _call(fact, x, bias, res, stride, padding, dilation, relu)
    y_ref = reference.conv2d_epilogue(x, [f.to(dtype) for f in fact.factors], bias, res, _pair(stride),
                                      _pair(padding), _pair(dilation), 1, kind, relu)
    assert y.shape == truth.shape and y.dtype == dtype
    assert _relative_max_error(y, truth) <= TOL[dtype]
    assert _relative_max_error(y_ref, truth) <= TOL[dtype]
    if relu and y.numel():
        assert (y >= 0).all() and (truth == 0).any()  # the ReLU had something to clamp


@pytest.mark.parametrize("kind", ["svd", "hsv", "kcp", "tucker2"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("residual_layout", LAYOUTS)
def test_epilogue_layouts(kind, layout, residual_layout):
    # The output lies like conv2d's (channels_last for channels_last input), whatever the residual's layout.
    fact, x, bias, residual, stride, padding, dilation, dense = _case(kind, SHAPES[0], torch.float32, layout,
                                                                       residual_layout)
    y = _call(fact, x, bias, residual, stride, padding, dilation, True)
    assert _relative_max_error(y, (dense + residual.double()).relu()) <= TOL[torch.float32]
    expected = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected)
    conv = torch.ops.hsv.conv2d(x, [f.float() for f in fact.factors], bias, [1, 1], [1, 1], [1, 1], 1, kind)
    assert y.stride() == conv.stride()


@pytest.mark.parametrize("kind", ["svd", "hsv"])
def test_epilogue_equals_conv_then_add_relu_bitwise(kind):
    # Same kernel, then the same float ops: the one-pass tail must not change a single bit.
    for layout in ["contiguous", "channels_last"]:
        fact, x, bias, residual, stride, padding, dilation, _ = _case(kind, SHAPES[0], torch.float32, layout, layout)
        fs = [f.float() for f in fact.factors]
        conv = torch.ops.hsv.conv2d(x, fs, bias, [1, 1], [1, 1], [1, 1], 1, kind)
        y = _call(fact, x, bias, residual, stride, padding, dilation, True)
        assert torch.equal(y, (conv + residual).relu())
        assert torch.equal(_call(fact, x, bias, None, stride, padding, dilation, True), conv.relu())
        assert torch.equal(_call(fact, x, bias, residual, stride, padding, dilation, False), conv + residual)


def test_epilogue_keeps_nan_and_leaves_residual_alone():
    fact, x, bias, residual, stride, padding, dilation, _ = _case("svd", SHAPES[0], torch.float32)
    residual[0, 3, 2, 2] = float("nan")
    residual[1, 0, 0, 0] = float("-inf")
    before = residual.clone()
    y = _call(fact, x, bias, residual, stride, padding, dilation, True)
    assert torch.isnan(y[0, 3, 2, 2]) and y[1, 0, 0, 0] == 0
    assert torch.isnan(y).sum() == 1
    assert torch.equal(residual.nan_to_num(), before.nan_to_num())


def test_epilogue_without_residual_or_relu_is_conv2d():
    fact, x, bias, _, stride, padding, dilation, _ = _case("hsv", SHAPES[1], torch.float32)
    y = _call(fact, x, bias, None, stride, padding, dilation, False)
    conv = torch.ops.hsv.conv2d(x, [f.float() for f in fact.factors], bias, [2, 2], [1, 1], [1, 1], 1, "hsv")
    assert torch.equal(y, conv)


@pytest.mark.parametrize("bad, match", [
    (lambda r: r[:, :, :-1], r"residual must have the conv output's shape \[2, 16, 9, 11\], got \[2, 16, 8, 11\]"),
    (lambda r: r[:, :1], "residual must have the conv output's shape"),  # would broadcast: refused
    # C++ names dtypes as ScalarType does, the fallback without _C as torch does
    (lambda r: r.double(),
     r"residual has dtype (Double|torch.float64) but the conv output has dtype (Float|torch.float32)"),
    (lambda r: r.to("meta"), "residual is on meta but the conv output is on cpu"),
])
def test_epilogue_bad_residual(bad, match):
    fact, x, bias, residual, stride, padding, dilation, _ = _case("svd", SHAPES[0], torch.float32)
    with pytest.raises(ValueError, match=match):
        _call(fact, x, bias, bad(residual), stride, padding, dilation, True)


def test_epilogue_bad_conv_arguments_still_named():
    fact, x, bias, residual, stride, padding, dilation, _ = _case("svd", SHAPES[0], torch.float32)
    with pytest.raises(ValueError, match="input has 4 channels"):
        _call(fact, x[:, :4], bias, residual, stride, padding, dilation, True)


@pytest.mark.parametrize("kind", KINDS)
def test_epilogue_opcheck(kind):
    fact, x, bias, residual, stride, padding, dilation, _ = _case(kind, SHAPES[0], torch.float64)
    for res, relu in [(residual, True), (None, True), (residual, False)]:
        torch.library.opcheck(torch.ops.hsv.conv2d_epilogue,
                              (x, list(fact.factors), bias, res, [1, 1], [1, 1], [1, 1], 1, kind, relu))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", ["add+relu", "relu", "add"])
def test_epilogue_gradcheck(kind, tail):
    spec = (2, 4, 6, 5, 6, 3, 3, 1, 1, 1)
    fact, x, bias, residual, stride, padding, dilation, _ = _case(kind, spec, torch.float64)
    add, relu = "add" in tail, "relu" in tail
    # keep values away from ReLU's kink, where finite differences and the derivative disagree
    dense = F.conv2d(x, fact.to_dense(), bias, 1, 1)
    residual = residual + torch.where(dense + residual > 0, 0.5, -0.5)
    leaves = [t.detach().requires_grad_() for t in (x, bias, residual, *fact.factors)]

    def fn(x, b, r, *fs):
        return torch.ops.hsv.conv2d_epilogue(x, list(fs), b, r if add else None, [1, 1], [1, 1], [1, 1], 1, kind,
                                             relu)
    assert torch.autograd.gradcheck(fn, leaves)


def test_epilogue_grads_match_unfused_autograd():
    fact, x, bias, residual, stride, padding, dilation, _ = _case("hsv", SHAPES[0], torch.float64)
    fs = [f.detach().requires_grad_() for f in fact.factors]
    x, residual = x.requires_grad_(), residual.requires_grad_()
    y = torch.ops.hsv.conv2d_epilogue(x, fs, None, residual, [1, 1], [1, 1], [1, 1], 1, "hsv", True)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, residual, *fs], g)
    y2 = (torch.ops.hsv.conv2d(x, fs, None, [1, 1], [1, 1], [1, 1], 1, "hsv") + residual).relu()
    grads2 = torch.autograd.grad(y2, [x, residual, *fs], g)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # only the residual wants a gradient: it is the masked output gradient
    (gr,) = torch.autograd.grad(torch.ops.hsv.conv2d_epilogue(x.detach(), [f.detach() for f in fs], None, residual,
                                                              [1, 1], [1, 1], [1, 1], 1, "hsv", True), [residual], g)
    assert torch.equal(gr, torch.where(y > 0, g, 0))


def test_epilogue_flops_are_conv2d_flops():
    fact, x, bias, residual, stride, padding, dilation, _ = _case("hsv", SHAPES[0], torch.float32)
    fs = [f.float() for f in fact.factors]
    with FlopCounterMode(display=False) as a:
        torch.ops.hsv.conv2d(x, fs, bias, [1, 1], [1, 1], [1, 1], 1, "hsv")
    with FlopCounterMode(display=False) as b:
        _call(fact, x, bias, residual, stride, padding, dilation, True)
    assert a.get_total_flops() > 0 and b.get_total_flops() == a.get_total_flops()


def test_epilogue_autocast_cpu():
    fact, x, bias, residual, stride, padding, dilation, dense = _case("svd", SHAPES[0], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _call(fact, x, bias, residual, stride, padding, dilation, True)
    assert y.dtype == torch.bfloat16
    assert _relative_max_error(y, (dense + residual.double()).relu()) <= TOL[torch.bfloat16]


def test_epilogue_under_compile():
    fact, x, bias, residual, stride, padding, dilation, _ = _case("hsv", SHAPES[0], torch.float32)
    fs = [f.float() for f in fact.factors]

    def fn(x, r):
        return torch.ops.hsv.conv2d_epilogue(x, fs, bias, r, [1, 1], [1, 1], [1, 1], 1, "hsv", True)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, residual), fn(x, residual), rtol=0, atol=0)


def test_hsvkernels_has_epilogue_op():
    assert hasattr(torch.ops.hsv, "conv2d_epilogue")
    assert hsvkernels.reference.conv2d_epilogue is reference.conv2d_epilogue
