"""A few small fused CUDA calls, for compute-sanitizer (memcheck, racecheck) to watch.

Each case runs the fused kernel (HSV_CUDA_IMPL=fused) and the composite chain on
the same input and fails when the fused kernel did not run or the two differ.
Small on purpose: racecheck slows kernels down by orders of magnitude.

    compute-sanitizer --tool memcheck python bench/cuda_fused_smoke.py
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

import hsvkernels  # noqa: E402
from hsvkernels._extension import _C  # noqa: E402

TOL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# (N, Cin, Cout, r, H, W, kh, kw, stride, padding, dilation)
CASES = [
    (2, 8, 16, 5, 9, 11, 3, 3, 1, 1, 1),        # odd sizes, rank 5
    (1, 40, 70, 35, 13, 11, 3, 3, 2, 1, 1),     # stride 2, K 360, two Cout chunks
    (1, 64, 96, 128, 7, 9, 3, 3, 1, 1, 1),      # the rank limit
    (3, 6, 10, 4, 6, 5, 2, 3, (2, 1), (0, 1), (1, 2)),  # non-square kernel, mixed stride/dilation
    (2, 16, 8, 8, 9, 9, 1, 1, 2, 0, 1),         # 1x1 stride 2
]


def run_case(case, dtype, channels_last):
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation = case
    opts = dict(device="cuda", dtype=dtype)
    x = torch.randn(n, cin, h, w, **opts)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    v = torch.randn(r, cin, kh, kw, **opts) / (cin * kh * kw) ** 0.5
    u = torch.randn(cout, r, **opts) / r ** 0.5
    bias = torch.randn(cout, **opts)
    args = ([v, u], bias, list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)), 1, "svd")
    os.environ["HSV_CUDA_IMPL"] = "composite"
    y_comp = torch.ops.hsv.conv2d(x, *args)
    os.environ["HSV_CUDA_IMPL"] = "fused"
    before = _C.cuda_fused_launch_count()
    y = torch.ops.hsv.conv2d(x, *args)
    torch.cuda.synchronize()
    if _C.cuda_fused_launch_count() != before + 1:
        raise SystemExit("fused kernel did not run for %s %s" % (case, dtype))
    err = ((y.float() - y_comp.float()).abs().max() / y_comp.float().abs().max()).item()
    if not err <= TOL[dtype]:
        raise SystemExit("fused != composite for %s %s channels_last=%s: error %.3g" % (case, dtype, channels_last,
                                                                                      err))
    return err


def run_hsv(dtype):
    """hsv level 1 with S1 = 1, T2 = 2: the same kernel with U = A kron I_T2."""
    opts = dict(device="cuda", dtype=dtype)
    b = torch.randn(6, 2, 12, 3, 3, **opts) / 6
    a = torch.randn(5, 1, 6, **opts) / 3
    x = torch.randn(2, 12, 9, 10, **opts).contiguous(memory_format=torch.channels_last)
    args = ([b, a], None, [1, 1], [1, 1], [1, 1], 1, "hsv")
    os.environ["HSV_CUDA_IMPL"] = "composite"
    y_comp = torch.ops.hsv.conv2d(x, *args)
    os.environ["HSV_CUDA_IMPL"] = "fused"
    before = _C.cuda_fused_launch_count()
    y = torch.ops.hsv.conv2d(x, *args)
    torch.cuda.synchronize()
    if _C.cuda_fused_launch_count() != before + 1:
        raise SystemExit("fused kernel did not run for hsv %s" % dtype)
    err = ((y.float() - y_comp.float()).abs().max() / y_comp.float().abs().max()).item()
    if not err <= TOL[dtype]:
        raise SystemExit("fused != composite for hsv %s: error %.3g" % (dtype, err))
    return err


def run_tucker2(dtype, channels_last):
    """tucker2, stride 2 (a halo of 17 x 17 per 8 x 8 tile), two Cout chunks."""
    opts = dict(device="cuda", dtype=dtype)
    us = torch.randn(12, 20, **opts) / 4
    core = torch.randn(10, 12, 3, 3, **opts) / 10
    ut = torch.randn(70, 10, **opts) / 3
    x = torch.randn(2, 20, 19, 17, **opts)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = ([us, core, ut], torch.randn(70, **opts), [2, 2], [1, 1], [1, 1], 1, "tucker2")
    os.environ["HSV_CUDA_IMPL"] = "composite"
    y_comp = torch.ops.hsv.conv2d(x, *args)
    os.environ["HSV_CUDA_IMPL"] = "fused"
    before = _C.cuda_fused_launch_count()
    y = torch.ops.hsv.conv2d(x, *args)
    torch.cuda.synchronize()
    if _C.cuda_fused_launch_count() != before + 1:
        raise SystemExit("fused kernel did not run for tucker2 %s" % dtype)
    err = ((y.float() - y_comp.float()).abs().max() / y_comp.float().abs().max()).item()
    if not err <= TOL[dtype]:
        raise SystemExit("fused != composite for tucker2 %s: error %.3g" % (dtype, err))
    return err


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def main():
    if not torch.cuda.is_available():
        raise SystemExit("cuda_fused_smoke.py: no CUDA device")
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = True   # the fused fp32 path runs where cuDNN may use TF32
    worst = 0.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            for case in CASES:
                worst = max(worst, run_case(case, dtype, channels_last))
            worst = max(worst, run_tucker2(dtype, channels_last))
        worst = max(worst, run_hsv(dtype))
    print("cuda_fused_smoke: %d fused calls match the composite chain (worst relative error %.3g)"
          % (3 * (2 * len(CASES) + 3), worst))


if __name__ == "__main__":
    main()
