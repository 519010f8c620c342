"""hsv::conv2d_epilogue on CUDA: the conv's kernel (fused or composite), then the residual add and ReLU.

HSV_CUDA_EPILOGUE=on puts the tail into the channels_last kernels' stores and runs
one pass after every other path; off (the default), ATen's add_ and relu_ after."""
import pytest
import torch
from conftest import requires_cuda
from factories import CASES
from test_cuda_fused import NHWC_IDS, NHWC_SPECS, make_input, nhwc_kernel, svd_factors  # noqa: F401 (a fixture)
from torch.nn.modules.utils import _pair

import hsvkernels
from hsvkernels import reference

pytestmark = [requires_cuda, pytest.mark.cuda]


@pytest.mark.parametrize("kind", ["svd", "hsv", "tucker2", "kcp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("impl", ["composite", "fused", "auto"])
@pytest.mark.parametrize("epilogue", ["off", "on"])
def test_cuda_epilogue_matches_reference(kind, dtype, channels_last, impl, epilogue, monkeypatch):
    monkeypatch.setenv("HSV_CUDA_IMPL", impl)
    monkeypatch.setenv("HSV_CUDA_EPILOGUE", epilogue)
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


@pytest.mark.parametrize("epilogue", ["off", "on"])
def test_cuda_fused_resnet_block_under_graphs(epilogue, monkeypatch):
    monkeypatch.setenv("HSV_CUDA_EPILOGUE", epilogue)
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


TAILS = {"add+relu": (True, True), "add": (True, False), "relu": (False, True)}


def unfused_tail(conv, residual, relu):
    y = conv if residual is None else conv + residual
    return y.relu() if relu else y


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", NHWC_SPECS, ids=NHWC_IDS)
def test_tail_in_nhwc_stores_is_the_unfused_tail_bitwise(spec, dtype, tail, nhwc_kernel, monkeypatch):
    # The stores add the residual to the conv's values as rounded to the dtype and round once more:
    # the same bits as conv2d, then add_, then relu_ (the same kernel computes the conv both times).
    monkeypatch.setenv("HSV_CUDA_IMPL", "fused")
    monkeypatch.setenv("HSV_CUDA_EPILOGUE", "on")
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation = spec
    factors = [f.to("cuda", dtype) for f in svd_factors(r, cin, cout, kh, kw).factors]
    bias = torch.randn(cout, device="cuda", dtype=dtype)
    x = make_input(n, cin, h, w, "channels_last", dtype)
    geom = (_pair(stride), _pair(padding), _pair(dilation), 1)
    conv = torch.ops.hsv.conv2d(x, factors, bias, *geom, "svd")
    with_residual, relu = TAILS[tail]
    residual = torch.randn_like(conv) if with_residual else None  # randn_like keeps channels_last
    if residual is not None and cout > 1:
        residual[0, :2, 0, 0] = float("nan")  # NaN goes through the add and the ReLU
    y = torch.ops.hsv.conv2d_epilogue(x, factors, bias, residual, *geom, "svd", relu)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, unfused_tail(conv, residual, relu), rtol=0, atol=0, equal_nan=True)
    nhwc_kernel(2)


@pytest.mark.parametrize("residual_layout", ["nchw", "misaligned"])
def test_tail_after_the_kernel_where_the_residual_lies_otherwise(residual_layout, nhwc_kernel, monkeypatch):
    # A residual the stores cannot read beside the output (another layout, or not 16-byte aligned)
    # gets the pass after the kernel: same result.
    monkeypatch.setenv("HSV_CUDA_IMPL", "fused")
    monkeypatch.setenv("HSV_CUDA_EPILOGUE", "on")
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation = NHWC_SPECS[0]
    factors = [f.to("cuda", torch.bfloat16) for f in svd_factors(r, cin, cout, kh, kw).factors]
    x = make_input(n, cin, h, w, "channels_last", torch.bfloat16)
    geom = ([stride] * 2, [padding] * 2, [dilation] * 2, 1)
    conv = torch.ops.hsv.conv2d(x, factors, None, *geom, "svd")
    if residual_layout == "nchw":
        residual = torch.randn(conv.shape, device="cuda", dtype=torch.bfloat16)
    else:  # channels_last strides, one element into its storage
        flat = torch.randn(conv.numel() + 1, device="cuda", dtype=torch.bfloat16)[1:]
        residual = flat.view(n, conv.shape[2], conv.shape[3], cout).permute(0, 3, 1, 2)
        assert residual.data_ptr() % 16 != 0 and residual.stride() == conv.stride()
    y = torch.ops.hsv.conv2d_epilogue(x, factors, None, residual, *geom, "svd", True)
    torch.testing.assert_close(y, (conv + residual).relu(), rtol=0, atol=0)
    nhwc_kernel(2)


@pytest.mark.parametrize("splits", ["2", "3"])
def test_tail_with_split_k(splits, nhwc_kernel, monkeypatch):
    # The wmma kernel sums split-K parts after it runs (atomics, so the order and the last bit may
    # differ between runs): the tail comes after that sum. The mma/wgmma clusters keep it in the stores.
    monkeypatch.setenv("HSV_CUDA_IMPL", "fused")
    monkeypatch.setenv("HSV_CUDA_EPILOGUE", "on")
    monkeypatch.setenv("HSV_CUDA_SPLIT_K", splits)
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation = NHWC_SPECS[2]
    factors = [f.to("cuda", torch.bfloat16) for f in svd_factors(r, cin, cout, kh, kw).factors]
    bias = torch.randn(cout, device="cuda", dtype=torch.bfloat16)
    x = make_input(n, cin, h, w, "channels_last", torch.bfloat16)
    geom = ([stride] * 2, [padding] * 2, [dilation] * 2, 1)
    conv = torch.ops.hsv.conv2d(x, factors, bias, *geom, "svd")
    residual = torch.randn_like(conv)
    y = torch.ops.hsv.conv2d_epilogue(x, factors, bias, residual, *geom, "svd", True)
    torch.testing.assert_close(y, (conv + residual).relu(), rtol=1.6e-2, atol=1e-2)
    nhwc_kernel(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 16, 6, 6)], ids=["odd_numel", "vector"])
def test_one_pass_tail_after_the_composite_chain(dtype, shape, monkeypatch):
    # The pass after a kernel without the tail: 8 elements per thread where sizes and alignment allow,
    # one otherwise (105 elements); the same bits as add_ then relu_ on the chain's output.
    monkeypatch.setenv("HSV_CUDA_IMPL", "composite")
    monkeypatch.setenv("HSV_CUDA_EPILOGUE", "on")
    n, cout, h, w = shape
    cin = 4
    factors = [f.to("cuda", dtype) for f in svd_factors(2, cin, cout, 3, 3).factors]
    x = torch.randn(n, cin, h, w, device="cuda", dtype=dtype)
    geom = ([1, 1], [1, 1], [1, 1], 1)
    conv = torch.ops.hsv.conv2d(x, factors, None, *geom, "svd")
    residual = torch.randn_like(conv)
    residual[0, 0, 0, 0] = float("nan")
    for res, relu in ((residual, True), (residual, False), (None, True)):
        y = torch.ops.hsv.conv2d_epilogue(x, factors, None, res, *geom, "svd", relu)
        torch.testing.assert_close(y, unfused_tail(conv, res, relu), rtol=0, atol=0, equal_nan=True)


def test_bad_epilogue_setting_errors(monkeypatch):
    monkeypatch.setenv("HSV_CUDA_EPILOGUE", "yes")
    factors = [f.to("cuda") for f in svd_factors(2, 4, 8, 3, 3, dtype=torch.float32).factors]
    x = torch.randn(1, 4, 5, 5, device="cuda")
    with pytest.raises(ValueError, match="HSV_CUDA_EPILOGUE"):
        torch.ops.hsv.conv2d_epilogue(x, factors, None, None, [1, 1], [1, 1], [1, 1], 1, "svd", True)
