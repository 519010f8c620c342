"""hsv::conv2d_epilogue on CUDA: the conv's kernel (fused or composite), then the residual add and ReLU."""
import pytest
import torch
from conftest import requires_cuda
from factories import CASES

import hsvkernels
from hsvkernels import reference

pytestmark = [requires_cuda, pytest.mark.cuda]


@pytest.mark.parametrize("kind", ["svd", "hsv", "tucker2", "kcp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("impl", ["composite", "fused", "auto"])
def test_cuda_epilogue_matches_reference(kind, dtype, channels_last, impl, monkeypatch):
    monkeypatch.setenv("HSV_CUDA_IMPL", impl)
    fact = CASES[kind].random((64, 32, 3, 3), dtype=torch.float32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 32, 14, 14, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    residual = torch.randn(4, 64, 14, 14, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    factors = [f.to("cuda", dtype) for f in fact.factors]
    bias = torch.randn(64, device="cuda", dtype=dtype)
    args = ([1, 1], [1, 1], [1, 1], 1, kind)
    y = torch.ops.hsv.conv2d_epilogue(x, factors, bias, residual, *args[:4], kind, True)
    conv = torch.ops.hsv.conv2d(x, factors, bias, *args)
    assert y.device.type == "cuda" and y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    close = 1e-2 if dtype == torch.bfloat16 else 1e-5  # the same kernel twice; cuDNN may pick differently
    torch.testing.assert_close(y, (conv + residual).relu(), rtol=close, atol=close)
    ref = reference.conv2d_epilogue(x.double(), [f.double() for f in factors], bias.double(), residual.double(),
                                    *args[:4], kind, True)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # TF32 may be on for the composite chain
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol
    with pytest.raises(ValueError, match="residual"):
        torch.ops.hsv.conv2d_epilogue(x, factors, bias, residual[:, :1], *args[:4], kind, True)


def test_cuda_fused_resnet_block_under_graphs():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    hsvkernels.convert_(model, "svd", ratio=4, fold_bn=True, progress=False)
    model = model.cuda().to(memory_format=torch.channels_last)
    gm = hsvkernels.fuse_epilogues(model)
    x = torch.randn(2, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(gm, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):
            y = compiled(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
