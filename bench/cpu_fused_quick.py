"""Quick CPU timing of kind "svd": fused kernel vs composite chain vs dense F.conv2d.

fp32, a few ResNet 3x3 layers at batch 1 and 8, SVD rank ~ 1/4 of the full rank.
All three run in one process on the same inputs, interleaved per repetition;
the median over many repetitions is reported. Not a substitute for the full
methodology in docs/performance.md §5 (no pinning, no cache control).

    PYTHONPATH=. python bench/cpu_fused_quick.py [--threads 2] [--reps 50]
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import hsvkernels
from hsvkernels import _host_malloc

# name, Cin, Cout, H, W, stride
LAYERS = [
    ("conv2_x 64@56", 64, 64, 56, 56, 1),
    ("conv3_x 128@28", 128, 128, 28, 28, 1),
    ("conv4_x 256@14", 256, 256, 14, 14, 1),
    ("conv5_x 512@7", 512, 512, 7, 7, 1),
    ("conv4_1 128->256 s2", 128, 256, 28, 28, 2),
]


def timed(fn, env):
    """(wall, process CPU) seconds of one call. On a shared machine the CPU time
    is the steadier number: it does not count time spent preempted (it does
    count OpenMP threads spinning at barriers)."""
    os.environ.update(env)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rank-div", type=int, default=4, help="rank = min(Cout, Cin*9) // rank_div")
    ap.add_argument("--channels-last", action="store_true", help="channels_last inputs (all three paths)")
    _host_malloc.add_argument(ap)
    args = ap.parse_args()
    _host_malloc.configure(args.host_malloc)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = hsvkernels.build_info()
    print("hsvkernels from %s" % os.path.dirname(hsvkernels.__file__))
    print("torch %s, threads %d, mkldnn %s, isa %s, fp32, %s, reps %d (median ms)" % (
        torch.__version__, torch.get_num_threads(), torch.backends.mkldnn.is_available(), info.get("cpu_isa"),
        "channels_last" if args.channels_last else "NCHW", args.reps))
    print("wall ms (median) | process-CPU ms (median)")
    hdr = ("layer", "N", "r", "fused", "compos.", "dense", "f/comp", "f/dense")
    print("%-22s %3s %4s %8s %8s %8s %6s %6s | %8s %8s %8s %6s %6s" % (hdr + hdr[3:]))
    for name, cin, cout, h, w, s in LAYERS:
        r = min(cout, cin * 9) // args.rank_div
        v = torch.randn(r, cin, 3, 3) / (cin * 9) ** 0.5
        u = torch.randn(cout, r) / r ** 0.5
        dense = (u @ v.reshape(r, -1)).reshape(cout, cin, 3, 3)
        bias = torch.randn(cout)
        for n in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(n, cin, h, w)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            call = lambda: torch.ops.hsv.conv2d(x, [v, u], bias, [s, s], [1, 1], [1, 1], 1, "svd")  # noqa: E731
            runs = {
                "fused": (call, {"HSV_CPU_IMPL": "fused"}),
                "composite": (call, {"HSV_CPU_IMPL": "composite"}),
                "dense": (lambda: F.conv2d(x, dense, bias, s, 1), {}),
            }
            times = {k: [] for k in runs}
            for _ in range(3):  # warm-up
                for fn, env in runs.values():
                    timed(fn, env)
            for _ in range(args.reps):
                for k, (fn, env) in runs.items():
                    times[k].append(timed(fn, env))
            cols = []
            for which in (0, 1):
                med = {k: statistics.median(t[which] for t in ts) * 1e3 for k, ts in times.items()}
                cols += [med["fused"], med["composite"], med["dense"], med["fused"] / med["composite"],
                         med["fused"] / med["dense"]]
            print("%-22s %3d %4d %8.3f %8.3f %8.3f %6.2f %6.2f | %8.3f %8.3f %8.3f %6.2f %6.2f" % (
                (name, n, r) + tuple(cols)))
    os.environ.pop("HSV_CPU_IMPL", None)


if __name__ == "__main__":
    main()
