"""Quick CPU timing of 1x1 factorized layers on NCHW input: fused (HSV_CPU_IMPL=fused,
which runs them through csrc/ops/cpu/pointwise_nchw.cpp) vs the composite chain vs
dense F.conv2d, at the ranks HSV picks for ResNet-50's 1x1 layers, stride 1 and
the stride-2 downsampling ones (ratio=4, macs_ratio=4). Random SVD factors; the
three paths interleaved per repetition in one process, medians. Less careful than
bench/layers.py, quick enough to steer work.

    python bench/cpu_pointwise_nchw.py --threads 1,2 --batch 8
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hsvkernels  # noqa: E402,F401  (registers torch.ops.hsv)
from hsvkernels import _host_malloc  # noqa: E402
from bench import timing  # noqa: E402

# Cin, Cout, H (= W) of the input, rank, stride
LAYERS = [(512, 128, 28, 24, 1), (512, 256, 28, 40, 1), (256, 128, 56, 16, 1), (128, 512, 28, 24, 1),
          (1024, 256, 14, 48, 1), (64, 256, 56, 12, 1), (256, 1024, 14, 48, 1), (2048, 512, 7, 96, 1),
          (256, 512, 56, 40, 2), (512, 1024, 28, 80, 2), (1024, 2048, 14, 168, 2)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=12)
    _host_malloc.add_argument(ap)
    args = ap.parse_args(argv)
    _host_malloc.configure(args.host_malloc)
    for line in timing.describe_environment(timing.environment("cpu")):
        print(line)
    torch.manual_seed(0)
    saved = os.environ.get("HSV_CPU_IMPL")
    try:
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            for cin, cout, hw, r, stride in LAYERS:
                v = torch.randn(r, cin, 1, 1) / cin ** 0.5
                u = torch.randn(cout, r) / r ** 0.5
                x = torch.randn(args.batch, cin, hw, hw)
                w = (u @ v.flatten(1)).view(cout, cin, 1, 1)
                op = lambda: torch.ops.hsv.conv2d(x, [v, u], None, [stride] * 2, [0, 0], [1, 1], 1, "svd")  # noqa: E731
                dense = lambda: F.conv2d(x, w, None, stride)  # noqa: E731
                paths = {"fused": ("fused", op), "composite": ("composite", op), "dense": (None, dense)}
                times = {k: [] for k in paths}
                for _ in range(args.reps):
                    for name, (impl, fn) in paths.items():
                        if impl:
                            os.environ["HSV_CPU_IMPL"] = impl
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
                ms = {k: 1e3 * statistics.median(t[2:]) for k, t in times.items()}  # the first two are warm-up
                print("threads %d  N=%d  %4d->%-4d @%-2d s%d r%-3d  fused %7.3f ms  composite %7.3f  dense %7.3f  "
                      "fused/composite %.2f  fused/dense %.2f"
                      % (threads, args.batch, cin, cout, hw, stride, r, ms["fused"], ms["composite"], ms["dense"],
                         ms["fused"] / ms["composite"], ms["fused"] / ms["dense"]))
    finally:
        if saved is None:
            os.environ.pop("HSV_CPU_IMPL", None)
        else:
            os.environ["HSV_CPU_IMPL"] = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
