"""Quick CPU timing of kind "hsv": fused kernel vs composite chain vs dense F.conv2d.

fp32, ResNet-style layers, HSV at ratio=4, macs_ratio=4: the split the method
picks (on random weights usually the SVD layout S1 = T2 = 1) and, with
--forced-splits, a split with S1 > 1 input groups (where the composite chain
runs a small-channel conv on the batch-folded view). All three paths run in
one process on the same inputs, interleaved per repetition; medians of wall
time and of process CPU time (steadier on a shared machine: it leaves out time
spent preempted). GFLOP/s of the fused kernel (factorized MACs) against the
measured single-core FMA peak x threads (bench/peak.py). Less careful than
bench/layers.py (no Timer blocks), but quick enough to steer kernel work.

    python bench/cpu_fused_hsv.py --threads 1 --batch 1,8 --layouts nchw,nhwc --forced-splits \
        --out bench/results/cpu-fused-hsv-1thread
"""
import argparse
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hsvkernels  # noqa: E402
from hsvkernels import _host_malloc  # noqa: E402
from bench import peak, timing  # noqa: E402

# name, Cin, Cout, H (= W), kernel, stride, padding, an S1 > 1 split (T1, S1, T2, S2)
LAYERS = [
    ("64@56 3x3", 64, 64, 56, 3, 1, 1, (16, 4, 4, 16)),
    ("128@28 3x3", 128, 128, 28, 3, 1, 1, (32, 4, 4, 32)),
    ("256@14 3x3", 256, 256, 14, 3, 1, 1, (64, 4, 4, 64)),
    ("512@7 3x3", 512, 512, 7, 3, 1, 1, (128, 4, 4, 128)),
    ("128@56 3x3 s2", 128, 128, 56, 3, 2, 1, (32, 4, 4, 32)),
    ("256->1024@14 1x1", 256, 1024, 14, 1, 1, 0, (256, 4, 4, 64)),
    ("256->64@56 1x1", 256, 64, 56, 1, 1, 0, (16, 4, 4, 64)),
    ("64->256@56 1x1", 64, 256, 56, 1, 1, 0, (64, 4, 4, 16)),
    ("64->64@56 1x1", 64, 64, 56, 1, 1, 0, (16, 4, 4, 16)),
    ("128->512@28 1x1", 128, 512, 28, 1, 1, 0, (128, 4, 4, 32)),
    ("512->128@28 1x1", 512, 128, 28, 1, 1, 0, (32, 4, 4, 128)),
    ("1024->256@14 1x1", 1024, 256, 14, 1, 1, 0, (64, 4, 4, 256)),
    ("1024->512@14 1x1", 1024, 512, 14, 1, 1, 0, (128, 4, 4, 256)),
    ("2048->512@7 1x1", 2048, 512, 7, 1, 1, 0, (128, 4, 4, 512)),
    ("512->2048@7 1x1", 512, 2048, 7, 1, 1, 0, (512, 4, 4, 128)),
]


def timed(fn, env):
    """(wall, process CPU) seconds of one call, with HSV_CPU_IMPL etc. set from env (as they were after)."""
    with timing.env_set(env):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--layouts", default="nchw,nhwc", help="nchw and/or nhwc (channels_last) inputs")
    ap.add_argument("--forced-splits", action="store_true", help="also time an S1 > 1 split per layer")
    ap.add_argument("--layers", default=None, help="comma list of name prefixes (default: all)")
    ap.add_argument("--peak-seconds", type=float, default=1.0)
    ap.add_argument("--out", default=None, help="path without extension: writes .md")
    ap.add_argument("--ab", default=None, metavar="VAR=VALUE",
                    help="also time the fused kernel with this HSV_* setting (e.g. HSV_CPU_CONV_TAPS=per_tap), "
                         "interleaved with the rest: columns 'ab ms' and 'f/ab'")
    _host_malloc.add_argument(ap)
    args = ap.parse_args(argv)
    ab = None
    if args.ab is not None:
        var, sep, val = args.ab.partition("=")
        if not sep or not var.startswith("HSV_") or not val:
            ap.error("--ab: expected HSV_NAME=VALUE, got %r" % args.ab)
        ab = (var, val)
    _host_malloc.configure(args.host_malloc)
    torch.set_num_threads(args.threads)
    env = timing.environment("cpu")
    head = timing.describe_environment(env)
    if hasattr(os, "getloadavg"):  # other processes on the machine (timings are only steady near 0)
        head.append("load average before the run (1/5/15 min): %.2f %.2f %.2f" % os.getloadavg())
    isa = os.environ.get("HSV_CPU_ISA") or (peak.runnable_isas() or ["scalar"])[0]
    core_peak = peak.fma_peaks(args.peak_seconds)[isa]
    head.append("fused ISA %s; measured single-core fp32 FMA peak %.1f GFLOP/s x %d threads = %.1f GFLOP/s"
                % (isa, core_peak, args.threads, core_peak * args.threads))
    head.append("reps %d per path, interleaved (a random order each rep); medians; dense = F.conv2d (oneDNN where "
                "torch picks it) on the reconstructed weight" % args.reps)
    if args.threads > 1:
        head.append("threads > 1: the process-CPU (cpu) columns also count OpenMP threads spin-waiting; "
                    "read the wall columns")
    for line in head:
        print(line)
    if ab:
        head.append("ab: the fused kernel with %s=%s ('fused' has it unset)" % ab)
    cols = ("layer", "split (T1,S1,T2,S2) P", "N", "layout", "fused ms", "comp ms", "dense ms", "f/comp", "f/dense",
            "cpu f/comp", "cpu f/dense", "GFLOP/s fused", "%peak") + (("ab ms", "f/ab") if ab else ())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print(lines[0], flush=True)
    torch.manual_seed(0)
    wanted = args.layers.split(",") if args.layers else None
    for name, cin, cout, h, k, s, p, forced in LAYERS:
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        weight = torch.randn(cout, cin, k, k) * (2.0 / (cin * k * k)) ** 0.5
        splits = [None] + ([forced] if args.forced_splits else [])
        for split in splits:
            opts = dict(ratio=4, macs_ratio=4, **({"split": split} if split else {}))
            fact = hsvkernels.decompose(weight, "hsv", **opts)
            factors = [f.contiguous() for f in fact.factors]
            dense_w = fact.to_dense().float()
            for n in [int(b) for b in args.batch.split(",")]:
                for layout in args.layouts.split(","):
                    x = torch.randn(n, cin, h, h)
                    if layout == "nhwc":
                        x = x.contiguous(memory_format=torch.channels_last)
                    call = lambda: torch.ops.hsv.conv2d(x, factors, None, [s, s], [p, p], [1, 1], 1,  # noqa: E731
                                                        "hsv")
                    unset = {ab[0]: None} if ab else {}
                    runs = {"fused": (call, {"HSV_CPU_IMPL": "fused", **unset}),
                            "composite": (call, {"HSV_CPU_IMPL": "composite"}),
                            "dense": (lambda: F.conv2d(x, dense_w, None, s, p), {})}
                    if ab:
                        runs["ab"] = (call, {"HSV_CPU_IMPL": "fused", ab[0]: ab[1]})
                    with torch.inference_mode():
                        with timing.env_set({"HSV_CPU_IMPL": "fused"}):
                            err = ((call() - F.conv2d(x, dense_w, None, s, p)).abs().max()
                                   / F.conv2d(x, dense_w, None, s, p).abs().max()).item()
                        assert err < 1e-4, "fused output wrong: %g" % err
                        times = {key: [] for key in runs}
                        for _ in range(2):
                            for fn, e in runs.values():
                                timed(fn, e)
                        # A fresh order each rep: a path that always ran right after dense (whose large
                        # weight and output evict the others' data) measured up to 16% slower than the
                        # same kernel elsewhere in the cycle (an A/A run of --ab at 512@7, batch 1).
                        order = random.Random(0)
                        for _ in range(args.reps):
                            for key in order.sample(list(runs), len(runs)):
                                fn, e = runs[key]
                                times[key].append(timed(fn, e))
                    wall = {key: statistics.median(t[0] for t in v) for key, v in times.items()}
                    cpu = {key: statistics.median(t[1] for t in v) for key, v in times.items()}
                    ho = (h + 2 * p - k) // s + 1
                    macs = n * fact.macs(ho, ho, h, h)
                    gflops = 2 * macs / wall["fused"] / 1e9
                    meta = fact.meta
                    row = (name, "%s %s" % (tuple(meta["split"]), meta["rank"]), str(n), layout,
                           "%.3f" % (1e3 * wall["fused"]), "%.3f" % (1e3 * wall["composite"]),
                           "%.3f" % (1e3 * wall["dense"]), "%.2f" % (wall["fused"] / wall["composite"]),
                           "%.2f" % (wall["fused"] / wall["dense"]), "%.2f" % (cpu["fused"] / cpu["composite"]),
                           "%.2f" % (cpu["fused"] / cpu["dense"]), "%.1f" % gflops,
                           "%.0f%%" % (100 * gflops / (core_peak * args.threads)))
                    if ab:
                        row += ("%.3f" % (1e3 * wall["ab"]), "%.2f" % (wall["fused"] / wall["ab"]))
                    lines.append("| " + " | ".join(row) + " |")
                    print(lines[-1], flush=True)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write("# Fused vs composite vs dense, kind hsv (bench/cpu_fused_hsv.py)\n\n```\n%s\n```\n\n%s\n"
                    % ("\n".join(head), "\n".join(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
