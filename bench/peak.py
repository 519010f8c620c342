"""This machine's single-core fp32 FMA peak, and the fused kernels' microkernels as a share of it.

The peak loop (hsvkernels._C.fma_peak_gflops) runs independent FMA chains with
no memory operands; the microkernel benchmark (hsvkernels._C.microkernel_gflops)
runs one register-blocked MR x NR block over K with L1-resident A, packed B and
C. Both report the best of many ~5 ms chunks, the least disturbed by other
processes, so on a shared machine they estimate what the core can do rather
than what it did on average. Other scripts (bench/layers.py) read the peak
from here to put layer GFLOP/s in context.

    python bench/peak.py [--seconds 2] [--k 64,128,256] [--out bench/results/peak-cpu]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hsvkernels  # noqa: E402
from bench import timing  # noqa: E402

_RANK = {"avx512": 2, "avx2": 1, "scalar": 0}


def runnable_isas():
    """The ISAs this build has and this CPU runs, widest first."""
    info = hsvkernels.build_info()
    if not info.get("extension"):
        return []
    return [i for i in ("avx512", "avx2", "scalar") if _RANK[i] <= _RANK[info["cpu_isa"]]]


# the microkernel variants each ISA has (ukernel.h): wide MR x NR, narrow (NR / 2), three (three vectors, its own
# MR), the 1x1 NCHW path's strided GEMMs (packed A; MR rows, and the short one's fewer), and the conv stage's
# call over 9 taps of K each ("taps"; its rate counts all 9K steps). The scalar strided kernel is left out: the
# compiler vectorizes its loop (SSE), so the scalar peak is no yardstick for it.
VARIANTS = {"avx512": ("wide", "narrow", "three", "strided", "strided_short", "b_rows", "b_rows_short"),
            "avx2": ("wide", "narrow", "three", "strided", "strided_short", "b_rows", "b_rows_short", "taps"),
            "scalar": ("wide", "taps")}


def fma_peaks(seconds=1.0):
    """isa -> single-core fp32 FMA peak in GFLOP/s."""
    return {isa: hsvkernels._C.fma_peak_gflops(isa, seconds) for isa in runnable_isas()}


def measure(seconds=1.0, ks=(64, 128, 256)):
    rows = []
    peaks = fma_peaks(seconds)
    for isa, peak in peaks.items():
        for variant in VARIANTS[isa]:
            for k in ks:
                rate = hsvkernels._C.microkernel_gflops(isa, k, seconds / 2, variant)
                rows.append(dict(isa=isa, kernel=variant, k=k, gflops=rate, peak_gflops=peak, share=rate / peak))
    return peaks, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per peak measurement (half that per microkernel row)")
    ap.add_argument("--k", default="64,128,256", help="microkernel K values")
    ap.add_argument("--out", default=None, help="path without extension: writes .md")
    args = ap.parse_args(argv)
    env = timing.environment("cpu")
    head = timing.describe_environment(env)
    if hasattr(os, "getloadavg"):  # other processes on the machine (timings are only steady near 0)
        head.append("load average before the run (1/5/15 min): %.2f %.2f %.2f" % os.getloadavg())
    for line in head:
        print(line)
    peaks, rows = measure(args.seconds, [int(k) for k in args.k.split(",")])
    lines = ["", "single core, fp32, best ~5 ms chunk over about %.1f s per row" % args.seconds, "",
             "| ISA | FMA peak GFLOP/s |", "|---|---|"]
    lines += ["| %s | %.1f |" % kv for kv in peaks.items()]
    lines += ["", "| ISA | microkernel | K | GFLOP/s | % of peak |", "|---|---|---|---|---|"]
    lines += ["| %s | %s | %d | %.1f | %.0f%% |" % (r["isa"], r["kernel"], r["k"], r["gflops"], 100 * r["share"])
              for r in rows]
    for line in lines:
        print(line)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write("# FMA peak and microkernel efficiency (bench/peak.py)\n\n```\n%s\n```\n%s\n"
                    % ("\n".join(head), "\n".join(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
