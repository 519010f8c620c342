"""Where a factorized layer's GPU time goes: the CUDA kernels of dense, composite and fused, one call each.

Runs each path under torch.profiler after warm-up and prints, per path, every
kernel it launched with its device time per call, the sum of those (the GPU
busy time) and the host wall time per call. A path whose wall time is far above
its kernel sum is bound by host overhead, not by its kernels.

    python bench/cuda_kernels.py --tags L3,L4,L5 --methods svd,hsv --batch 32 --dtype bfloat16 --channels-last
"""
import argparse
import os
import sys
import time
from collections import defaultdict

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import hsvkernels  # noqa: E402
from bench import suite  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kernel_times(fn, calls):
    """{kernel name: device microseconds per call}, and host wall microseconds per call."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / calls * 1e6
    per_kernel = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name] += e.device_time_total / calls
    return dict(per_kernel), wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    suite.add_filter_args(p)
    p.add_argument("--methods", default="svd,hsv")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--macs-ratio", type=float, default=4.0)
    p.add_argument("--calls", type=int, default=50)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("cuda_kernels.py: needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    dtype = DTYPES[args.dtype]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    print("device %s  torch %s  cudnn %s  dtype %s  channels_last %s  batch %d  cudnn.benchmark True  "
          "cudnn.allow_tf32 %s" % (torch.cuda.get_device_name(), torch.__version__, torch.backends.cudnn.version(),
                                   args.dtype, args.channels_last, args.batch, torch.backends.cudnn.allow_tf32))
    torch.manual_seed(0)
    for shape in suite.select_from_args(args):
        kw = shape.conv_kwargs()
        w = torch.randn(shape.weight_shape, dtype=torch.float32)
        x = torch.randn(args.batch, shape.cin, shape.h, shape.w, device="cuda", dtype=dtype).to(memory_format=fmt)
        wd = w.to("cuda", dtype).to(memory_format=fmt)
        # name -> (HSV_CUDA_IMPL to set before timing, or None; the call)
        paths = {"dense": (None, lambda: F.conv2d(x, wd, None, kw["stride"], kw["padding"], kw["dilation"],
                                                  kw["groups"]))}
        for method in args.methods.split(","):
            try:
                fact = hsvkernels.decompose(w, method, ratio=args.ratio, macs_ratio=args.macs_ratio)
            except (ValueError, TypeError) as exc:
                print("%s %s: %s" % (shape.name, method, exc))
                continue
            factors = [f.to("cuda", dtype) for f in fact.factors]
            for impl in ("composite", "fused"):
                def call(factors=factors, kind=fact.kind):
                    return torch.ops.hsv.conv2d(x, factors, None, kw["stride"], kw["padding"], kw["dilation"],
                                                kw["groups"], kind)
                paths["%s %s (%s)" % (impl, method, "x".join(str(tuple(f.shape)) for f in factors))] = (impl, call)
        print("\n== %s %s" % (shape.name, shape.describe()))
        with torch.inference_mode():
            for name, (impl, fn) in paths.items():
                if impl is not None:   # set once, outside the timed calls (the op reads it per call)
                    os.environ["HSV_CUDA_IMPL"] = impl
                kernels, wall = kernel_times(fn, args.calls)
                print("  %-70s wall %8.1f us  kernels %8.1f us" % (name[:70], wall, sum(kernels.values())))
                for k, t in sorted(kernels.items(), key=lambda kv: -kv[1]):
                    print("      %8.1f us  %s" % (t, k[:110]))
    os.environ.pop("HSV_CUDA_IMPL", None)


if __name__ == "__main__":
    main()
