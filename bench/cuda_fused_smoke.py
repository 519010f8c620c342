"""A few small fused CUDA calls, for compute-sanitizer (memcheck, racecheck) to watch.

Each case runs a fused kernel (HSV_CUDA_IMPL=fused) and fails when it did not run
or its output is off from F.conv2d on the dense weight, computed on the CPU in
float64: no cuDNN kernel runs on the GPU, so what the sanitizer reports is in the
fused kernels (or in the few plain ATen kernels that make inputs and pad factors).
Small on purpose: racecheck slows kernels down by orders of magnitude.

    compute-sanitizer --tool racecheck python bench/cuda_fused_smoke.py
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hsvkernels  # noqa: E402
from hsvkernels._extension import _C  # noqa: E402

TOL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# svd: (N, Cin, Cout, r, H, W, kh, kw, stride, padding, dilation)
SVD_CASES = [
    (2, 8, 16, 5, 9, 11, 3, 3, 1, 1, 1),        # odd sizes, rank 5
    (1, 40, 70, 35, 13, 11, 3, 3, 2, 1, 1),     # stride 2, K 360, two Cout chunks
    (1, 64, 96, 128, 7, 9, 3, 3, 1, 1, 1),      # the rank limit
    (3, 6, 10, 4, 6, 5, 2, 3, (2, 1), (0, 1), (1, 2)),  # non-square kernel, mixed stride/dilation
    (2, 16, 8, 8, 9, 9, 1, 1, 2, 0, 1),         # 1x1 stride 2
    # Cin % 32 == 0, Cout % 8 == 0: the channels_last fast path for fp16/bf16
    (2, 64, 72, 24, 9, 7, 3, 3, 1, 1, 1),       # rank 24 -> 32, two Cout chunks
    (1, 32, 16, 100, 6, 5, 3, 2, (2, 1), (1, 0), (1, 2)),  # rank 100 -> 128, split-K, mixed geometry
]


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def check(kind, factors, shape, x, bias, stride, padding, dilation, tol=None):
    """One fused call against float64 truth on the CPU; returns the relative error."""
    os.environ["HSV_CUDA_IMPL"] = "fused"
    before = _C.cuda_fused_launch_count()
    y = torch.ops.hsv.conv2d(x, factors, bias, _pair(stride), _pair(padding), _pair(dilation), 1, kind)
    torch.cuda.synchronize()
    if _C.cuda_fused_launch_count() != before + 1:
        raise SystemExit("fused kernel did not run: %s %s %s" % (kind, shape, x.dtype))
    dense = hsvkernels.Factorization(kind, [f.double().cpu() for f in factors], shape).to_dense()
    truth = F.conv2d(x.double().cpu(), dense, None if bias is None else bias.double().cpu(), _pair(stride),
                     _pair(padding), _pair(dilation))
    err = ((y.double().cpu() - truth).abs().max() / truth.abs().max()).item()
    if not err <= (tol or TOL[x.dtype]):
        raise SystemExit("fused output off for %s %s %s layout %s: error %.3g"
                         % (kind, shape, x.dtype, "channels_last" if x.stride(1) == 1 else "NCHW", err))
    return err


def make_x(n, c, h, w, dtype, channels_last):
    x = torch.randn(n, c, h, w, device="cuda", dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def svd_case(case, dtype, channels_last):
    """One SVD_CASES entry on fresh random factors, input and bias; returns its relative error."""
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation = case
    opts = dict(device="cuda", dtype=dtype)
    v = torch.randn(r, cin, kh, kw, **opts) / (cin * kh * kw) ** 0.5
    u = torch.randn(cout, r, **opts) / r ** 0.5
    return check("svd", [v, u], (cout, cin, kh, kw), make_x(n, cin, h, w, dtype, channels_last),
                 torch.randn(cout, **opts), stride, padding, dilation)


def kcp_case(merged, dtype, channels_last):
    """The fused kcp kernel (HSV_CUDA_KCP=on) at Q=2, N=3, S1=3, R=5, S2=16, T1=3, T2=16, 3x3, stride 2:
    odd ranks padded to the tensor-core tiles, partial edge tiles, a halo chunk boundary."""
    q, n, s1, r, s2, t1, t2 = 2, 3, 3, 5, 16, 3, 16
    opts = dict(device="cuda", dtype=dtype)
    fs = [torch.randn(q, n, s1, **opts) / s1 ** 0.5, torch.randn(n, r, s2, **opts) / s2 ** 0.5,
          torch.randn(n, r, 3, **opts) / 3 ** 0.5, torch.randn(n, r, 3, **opts) / 3 ** 0.5]
    if merged:
        fs.append(torch.randn(t1 * t2, q, n, r, **opts) / (q * n * r) ** 0.5)
    else:
        fs += [torch.randn(n, t2, r, **opts) / r ** 0.5, torch.randn(t1, q, n, **opts) / (q * n) ** 0.5]
    os.environ["HSV_CUDA_KCP"] = "on"
    before = _C.cuda_kcp_launch_count()
    # four rounded intermediates: the tolerance of tests/test_kcp_cta_emulate.py
    err = check("kcp", fs, (t1 * t2, s1 * s2, 3, 3), make_x(2, s1 * s2, 13, 11, dtype, channels_last),
                torch.randn(t1 * t2, **opts), 2, 1, 1, tol={torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype])
    os.environ.pop("HSV_CUDA_KCP")
    if _C.cuda_kcp_launch_count() != before + 1:
        raise SystemExit("the kcp kernel did not run where HSV_CUDA_KCP=on asked for it")
    return err


def epilogue_case(case, dtype, channels_last):
    """conv2d_epilogue with HSV_CUDA_EPILOGUE=on (the residual add and ReLU in the channels_last kernels'
    stores, a pass after the others) against the same fused conv followed by ATen's add and relu: equal."""
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation = case
    opts = dict(device="cuda", dtype=dtype)
    factors = [torch.randn(r, cin, kh, kw, **opts) / (cin * kh * kw) ** 0.5, torch.randn(cout, r, **opts) / r ** 0.5]
    x, bias = make_x(n, cin, h, w, dtype, channels_last), torch.randn(cout, **opts)
    geom = (_pair(stride), _pair(padding), _pair(dilation), 1)
    os.environ["HSV_CUDA_IMPL"] = "fused"
    conv = torch.ops.hsv.conv2d(x, factors, bias, *geom, "svd")
    residual = torch.randn_like(conv)
    os.environ["HSV_CUDA_EPILOGUE"] = "on"
    y = torch.ops.hsv.conv2d_epilogue(x, factors, bias, residual, *geom, "svd", True)
    os.environ.pop("HSV_CUDA_EPILOGUE")
    if not torch.equal(y, (conv + residual).relu()):
        raise SystemExit("conv2d_epilogue's tail differs from add and relu after the conv: %s %s" % (case, dtype))


def main():
    if not torch.cuda.is_available():
        raise SystemExit("cuda_fused_smoke.py: no CUDA device")
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = True   # the fused fp32 path runs where cuDNN may use TF32
    worst, calls = 0.0, 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        opts = dict(device="cuda", dtype=dtype)
        for channels_last in (False, True):
            for case in SVD_CASES:
                worst = max(worst, svd_case(case, dtype, channels_last))
                calls += 1
            # tucker2, stride 2: a 17 x 17 halo per 8 x 8 tile, two Cout chunks
            us = torch.randn(12, 20, **opts) / 20 ** 0.5
            core = torch.randn(10, 12, 3, 3, **opts) / 108 ** 0.5
            ut = torch.randn(70, 10, **opts) / 10 ** 0.5
            x = make_x(2, 20, 19, 17, dtype, channels_last)
            worst = max(worst, check("tucker2", [us, core, ut], (70, 20, 3, 3), x, torch.randn(70, **opts), 2, 1, 1))
            # hsv level 1 with S1 = 1, T2 = 2: the two-stage kernel with U = A kron I_T2
            b = torch.randn(6, 2, 12, 3, 3, **opts) / 108 ** 0.5
            a = torch.randn(5, 1, 6, **opts) / 6 ** 0.5
            x = make_x(2, 12, 9, 10, dtype, channels_last)
            worst = max(worst, check("hsv", [b, a], (10, 12, 3, 3), x, None, 1, 1, 1))
            calls += 2
            if dtype != torch.float32 and torch.cuda.get_device_capability()[0] >= 8:
                for merged in (False, True):
                    worst = max(worst, kcp_case(merged, dtype, channels_last))
                    calls += 1
    # the channels_last kernels (HSV_CUDA_NHWC), each whole and split over K
    # (the mma and wgmma kernels sum their partials through a cluster's shared memory);
    # wgmma where the build has its sm_90a code and the device is a 9.x
    major = torch.cuda.get_device_capability()[0]
    kernels = ("mma", "wmma") if major >= 9 else ("wmma",)
    if major == 9 and hsvkernels.build_info().get("cuda_sm90a"):
        kernels += ("wgmma",)
    mma_before, wgmma_before = _C.cuda_mma_launch_count(), _C.cuda_wgmma_launch_count()
    # (and the mma kernel with and without input blocks, HSV_CUDA_MMA_HALO: both cases have >= 4 taps)
    for kernel in kernels:
        for halo in ("0", "1") if kernel == "mma" else ("0",):
            for splits in ("1", "3"):
                os.environ["HSV_CUDA_NHWC"], os.environ["HSV_CUDA_SPLIT_K"] = kernel, splits
                os.environ["HSV_CUDA_MMA_HALO"] = halo
                for case in SVD_CASES[-2:]:
                    worst = max(worst, svd_case(case, torch.bfloat16, True))
                    calls += 1
                    if kernel == "mma" and _C.cuda_mma_last_config()[4] != int(halo):
                        raise SystemExit("HSV_CUDA_MMA_HALO=%s did not take effect" % halo)
    for name in ("HSV_CUDA_NHWC", "HSV_CUDA_SPLIT_K", "HSV_CUDA_MMA_HALO"):
        os.environ.pop(name)
    # the factors packed by ATen ops (HSV_CUDA_PACK=aten) instead of the packing kernel
    os.environ["HSV_CUDA_PACK"] = "aten"
    for dtype, channels_last in ((torch.float32, False), (torch.bfloat16, True)):
        opts = dict(device="cuda", dtype=dtype)
        for case in SVD_CASES:
            worst = max(worst, svd_case(case, dtype, channels_last))
            calls += 1
        b = torch.randn(6, 2, 12, 3, 3, **opts) / 108 ** 0.5
        a = torch.randn(5, 1, 6, **opts) / 6 ** 0.5
        worst = max(worst, check("hsv", [b, a], (10, 12, 3, 3), make_x(2, 12, 9, 10, dtype, channels_last),
                                 torch.randn(10, **opts), 1, 1, 1))
        calls += 1
    os.environ.pop("HSV_CUDA_PACK")
    if "mma" in kernels and _C.cuda_mma_launch_count() - mma_before < 8:
        raise SystemExit("the mma kernel did not run where HSV_CUDA_NHWC=mma asked for it")
    if "wgmma" in kernels and _C.cuda_wgmma_launch_count() - wgmma_before != 4:
        raise SystemExit("the wgmma kernel did not run where HSV_CUDA_NHWC=wgmma asked for it")
    # conv2d_epilogue's residual add and ReLU in each channels_last kernel's stores, the mma and wgmma
    # kernels also split over a cluster (the wmma kernel's split-K sums with atomics, in no fixed order,
    # and adds the tail after: the two convs compared would not be bitwise equal)
    for kernel in kernels:
        for splits in ("1",) if kernel == "wmma" else ("1", "3"):
            os.environ["HSV_CUDA_NHWC"], os.environ["HSV_CUDA_SPLIT_K"] = kernel, splits
            epilogue_case(SVD_CASES[-2], torch.bfloat16, True)
            calls += 2
    for name in ("HSV_CUDA_NHWC", "HSV_CUDA_SPLIT_K"):
        os.environ.pop(name)
    for dtype in (torch.float32, torch.float16):  # the pass after the NCHW kernel; odd sizes: the scalar loop
        epilogue_case(SVD_CASES[0], dtype, False)
        calls += 2
    print("cuda_fused_smoke: %d fused calls match float64 truth (worst relative error %.3g), channels_last kernels %s"
          % (calls, worst, ", ".join(kernels)))


if __name__ == "__main__":
    main()
