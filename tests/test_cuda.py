"""The op on a CUDA device: the same matrix as on CPU, plus half precision. Skipped without a GPU."""
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from factories import CASES, KINDS
from test_op import SHAPES

import hsvkernels

pytestmark = [requires_cuda, pytest.mark.cuda]

# Relative max error against a float64 ground truth; half types accumulate in fp32.
TOL = {torch.float64: 1e-11, torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_op_matches_dense(kind, spec, dtype, channels_last):
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
    if not CASES[kind].supports((cout, cin, kh, kw)):
        pytest.skip("shape not representable")
    fact = CASES[kind].random((cout, cin, kh, kw), dtype=torch.float64)
    x = torch.randn(n, cin, h, w, dtype=torch.float64)
    bias = torch.randn(cout, dtype=torch.float64)
    truth = F.conv2d(x, fact.to_dense(), bias, stride, padding, dilation)
    xd = x.to("cuda", dtype)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    y = hsvkernels.conv2d(xd, fact.to("cuda", dtype), bias.to("cuda", dtype), stride, padding, dilation)
    assert y.device.type == "cuda" and y.dtype == dtype
    if channels_last and n > 0:
        assert y.is_contiguous(memory_format=torch.channels_last)
    if truth.numel():
        err = ((y.double().cpu() - truth).abs().max() / truth.abs().max()).item()
        assert err <= TOL[dtype]


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_gradcheck_and_opcheck(kind):
    fact = CASES[kind].random((6, 4, 3, 3), dtype=torch.float64)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    factors = [f.to("cuda").requires_grad_() for f in fact.factors]
    bias = torch.randn(6, dtype=torch.float64, device="cuda", requires_grad=True)
    nf = len(factors)

    def fn(x, *rest):
        return torch.ops.hsv.conv2d(x, list(rest[:nf]), rest[nf], [2, 2], [1, 1], [1, 1], 1, kind)

    assert torch.autograd.gradcheck(fn, (x, *factors, bias))
    torch.library.opcheck(torch.ops.hsv.conv2d.default,
                          (x.float(), [f.float() for f in factors], bias.float(), [2, 2], [1, 1], [1, 1], 1, kind))


def test_cuda_graph_compile():
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).cuda()
    layer = hsvkernels.FactorizedConv2d.from_conv(conv, method="svd", ratio=4)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(4, 16, 14, 14, device="cuda")
    for _ in range(3):
        y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-3, atol=1e-3)
