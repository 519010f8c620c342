"""Gradients, opcheck, torch.compile and FLOP counting of hsv::conv2d."""
import pytest
import torch
import torch.nn.functional as F
from factories import CASES, KINDS
from torch.utils.flop_counter import FlopCounterMode

import hsvkernels

GRAD_SHAPES = [
    # (N, Cin, Cout, H, W, kh, kw, stride, padding, dilation)
    (2, 4, 6, 6, 7, 3, 3, 2, 1, 1),
    (1, 6, 4, 5, 5, 1, 3, 1, (0, 1), (1, 2)),
]


def _grad_case(kind, spec, dtype=torch.float64):
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
    shape = (cout, cin, kh, kw)
    if not CASES[kind].supports(shape):
        pytest.skip("kind %s cannot represent shape %s" % (kind, shape))
    fact = CASES[kind].random(shape, dtype=dtype)
    x = torch.randn(n, cin, h, w, dtype=dtype, requires_grad=True)
    factors = [f.clone().requires_grad_() for f in fact.factors]
    bias = torch.randn(cout, dtype=dtype, requires_grad=True)
    return x, factors, bias, stride, padding, dilation


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", GRAD_SHAPES, ids=["strided", "dilated"])
def test_gradcheck_float64(kind, spec):
    x, factors, bias, stride, padding, dilation = _grad_case(kind, spec)
    nf = len(factors)

    def fn(x, *rest):
        return torch.ops.hsv.conv2d(x, list(rest[:nf]), rest[nf], _pair(stride), _pair(padding), _pair(dilation), 1,
                                    kind)

    assert torch.autograd.gradcheck(fn, (x, *factors, bias), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_dense_autograd(kind):
    x, factors, bias, stride, padding, dilation = _grad_case(kind, GRAD_SHAPES[0])
    y = torch.ops.hsv.conv2d(x, factors, bias, [2, 2], [1, 1], [1, 1], 1, kind)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *factors, bias], g)
    x2 = x.detach().clone().requires_grad_()
    f2 = [f.detach().clone().requires_grad_() for f in factors]
    b2 = bias.detach().clone().requires_grad_()
    fmt = hsvkernels.FORMATS[kind]
    y2 = F.conv2d(x2, fmt.to_dense(f2), b2, 2, 1)
    grads2 = torch.autograd.grad(y2, [x2, *f2, b2], g)
    for a, b in zip(grads, grads2):
        assert (a - b).abs().max().item() < 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_partial_gradients(kind):
    # Only the input needs a gradient (a frozen compressed layer inside a trained model), and only the factors.
    x, factors, bias, *_ = _grad_case(kind, GRAD_SHAPES[0])
    frozen = [f.detach() for f in factors]
    (gx,) = torch.autograd.grad(torch.ops.hsv.conv2d(x, frozen, None, [2, 2], [1, 1], [1, 1], 1, kind).sum(), [x])
    assert gx.shape == x.shape
    xd = x.detach()
    gf = torch.autograd.grad(torch.ops.hsv.conv2d(xd, factors, None, [2, 2], [1, 1], [1, 1], 1, kind).sum(), factors)
    assert all(g.shape == f.shape for g, f in zip(gf, factors))


def _opcheck_samples(kind):
    samples = []
    for spec in GRAD_SHAPES:
        for requires_grad in (False, True):
            n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
            if not CASES[kind].supports((cout, cin, kh, kw)):
                continue
            fact = CASES[kind].random((cout, cin, kh, kw), dtype=torch.float32)
            x = torch.randn(n, cin, h, w, requires_grad=requires_grad)
            factors = [f.clone().requires_grad_(requires_grad) for f in fact.factors]
            for bias in (None, torch.randn(cout, requires_grad=requires_grad)):
                samples.append((x, factors, bias, _pair(stride), _pair(padding), _pair(dilation), 1, kind))
            xcl = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
            samples.append((xcl.requires_grad_(requires_grad), factors, None, _pair(stride), _pair(padding),
                            _pair(dilation), 1, kind))
    return samples


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind):
    for args in _opcheck_samples(kind):
        torch.library.opcheck(torch.ops.hsv.conv2d.default, args)


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck_backward_op(kind):
    x, factors, bias, stride, padding, dilation = _grad_case(kind, GRAD_SHAPES[0], torch.float32)
    x, factors = x.detach(), [f.detach() for f in factors]
    y = torch.ops.hsv.conv2d(x, factors, None, [2, 2], [1, 1], [1, 1], 1, kind)
    for mask in ([True, True, True], [True, False, False], [False, True, False], [False, False, True]):
        torch.library.opcheck(torch.ops.hsv.conv2d_backward.default,
                              (torch.randn_like(y), x, factors, True, [2, 2], [1, 1], [1, 1], 1, kind, mask),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kind", KINDS)
def test_flop_counter_matches_stage_macs(kind):
    n, cin, cout, h, w = 3, 8, 16, 9, 11
    fact = CASES[kind].random((cout, cin, 3, 3), dtype=torch.float32)
    x = torch.randn(n, cin, h, w)
    with FlopCounterMode(display=False) as counter:
        y = hsvkernels.conv2d(x, fact, None, 1, 1)
    assert counter.get_total_flops() == 2 * n * fact.macs(y.shape[2], y.shape[3])
    # The reference chain, counted by aten's own conv formulas, gives the same number.
    with FlopCounterMode(display=False) as counter_ref:
        hsvkernels.reference.conv2d(x, fact, None, 1, 1)
    assert counter_ref.get_total_flops() == counter.get_total_flops()


def test_factorization_costs_count_tensor_sizes():
    for kind in KINDS:
        fact = CASES[kind].random((16, 8, 3, 3), dtype=torch.float32)
        assert fact.num_params() == sum(f.numel() for f in fact.factors)
        assert fact.dense_params() == 16 * 8 * 9
        assert fact.dense_macs(5, 7) == 16 * 8 * 9 * 35


class _Net(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fconv = hsvkernels.FactorizedConv2d.from_conv(conv, method="svd", rank=8) if kind == "svd" else None
        if self.fconv is None:
            fact = CASES[kind].random((16, 8, 3, 3), dtype=torch.float32)
            self.fconv = hsvkernels.FactorizedConv2d(fact, padding=1, bias=torch.zeros(16))

    def forward(self, x):
        return torch.relu(self.fconv(x)).mean(dim=(2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_fullgraph(kind):
    torch._dynamo.reset()
    net = _Net(kind)
    compiled = torch.compile(net, fullgraph=True)
    x = torch.randn(2, 8, 10, 10)
    torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)
    compiled(x).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(x).sum().backward()
    for g, p in zip(grads, net.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph_under_no_grad():
    # the no_grad shortcut past the autograd kernel (ops.call_conv2d) must not break dynamo's graph
    torch._dynamo.reset()
    net = _Net("svd")
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(net, fullgraph=True)(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["svd", "hsv"])
def test_no_grad_calls_skip_the_autograd_kernel(kind, monkeypatch):
    # With grad mode off, FactorizedConv2d and hsvkernels.conv2d dispatch below autograd (the Python autograd
    # kernel would only redispatch there); with grad on they go through it and stay differentiable.
    from hsvkernels import ops
    if ops._BELOW_AUTOGRAD is None:
        pytest.skip("no native extension: the op is the reference chain (CompositeImplicitAutograd)")
    entered = []
    real = ops._BELOW_AUTOGRAD

    def counting():
        entered.append(torch.is_grad_enabled())
        return real()
    monkeypatch.setattr(ops, "_BELOW_AUTOGRAD", counting)
    layer = _Net(kind).fconv
    x = torch.randn(2, 8, 7, 9)
    y = layer(x)
    assert entered == [] and y.requires_grad and y.grad_fn is not None
    with torch.no_grad():
        y_no_grad = layer(x)
        y_functional = hsvkernels.conv2d(x, layer.factorization, layer.bias, padding=1)
    assert entered == [False, False] and not y_no_grad.requires_grad
    torch.testing.assert_close(y_no_grad, y.detach(), rtol=0, atol=0)
    torch.testing.assert_close(y_functional, y.detach(), rtol=1e-6, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), y.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_cpu_runs_in_bfloat16(kind):
    fact = CASES[kind].random((16, 8, 3, 3), dtype=torch.float32)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    factors = [f.clone().requires_grad_() for f in fact.factors]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.hsv.conv2d(x, factors, None, [1, 1], [1, 1], [1, 1], 1, kind)
    assert y.dtype == torch.bfloat16
    truth = F.conv2d(x.double(), fact.to_dense().double(), None, 1, 1)
    assert ((y.double() - truth).abs().max() / truth.abs().max()).item() < 3e-2
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and all(f.grad.dtype == torch.float32 for f in factors)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_export_round_trip(kind, tmp_path):
    fact = CASES[kind].random((16, 8, 3, 3), dtype=torch.float32)
    layer = hsvkernels.FactorizedConv2d(fact, padding=1, bias=torch.randn(16))
    x = torch.randn(2, 8, 10, 10)
    exported = torch.export.export(layer, (x,))
    path = tmp_path / "layer.pt2"
    torch.export.save(exported, str(path))
    loaded = torch.export.load(str(path))
    torch.testing.assert_close(loaded.module()(x), layer(x))
