"""A device's measured ceilings (dense matmul throughput, memory bandwidth) and the roofline they give a layer.

bench/layers.py puts every timed path against them: achieved TFLOP/s and GB/s,
and the share of the roofline bound, max(FLOPs / matmul ceiling, bytes /
bandwidth ceiling). The ceilings are measured, not datasheet numbers: a large
square torch.matmul in the benchmark's dtype, under the same TF32 flags (a conv
layer's GEMMs are smaller, so a layer rarely reaches it), and a large
device-to-device copy (read + write). Bytes are the compulsory traffic: input,
weights (or factors) and output, each moved once; what a chain writes and reads
back in between is not counted, so its GB/s is an effective, not a measured, rate.

    python bench/ceilings.py --device cuda --dtype bfloat16
"""
import argparse
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from bench import timing  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Big enough to run at the device's rate, small enough to measure in a second.
MATMUL_N = {"cuda": 8192, "cpu": 1024}
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 27}


def matmul_tflops(device, dtype, n=None, seconds=0.5):
    """TFLOP/s of an n x n x n torch.matmul (median over timed blocks after warm-up)."""
    device = torch.device(device)
    n = n or MATMUL_N[device.type]
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = timing.time_one(lambda: torch.matmul(a, b, out=out), min_run_time=seconds)["median"]
    return 2.0 * n ** 3 / t / 1e12


def copy_gbps(device, nbytes=None, seconds=0.5):
    """GB/s of a device-to-device copy of nbytes, counting its read and its write."""
    device = torch.device(device)
    nbytes = nbytes or COPY_BYTES[device.type]
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = timing.time_one(lambda: dst.copy_(src), min_run_time=seconds)["median"]
    return 2.0 * src.numel() * 4 / t / 1e9


def measure(device, dtype, seconds=1.0, matmul_n=None, copy_bytes=None):
    """The ceilings as a dict: tflops, gbps, and what they were measured with."""
    device = torch.device(device)
    flags = {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32} if device.type == "cuda" else {}
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "matmul_n": matmul_n or MATMUL_N[device.type], "copy_bytes": copy_bytes or COPY_BYTES[device.type],
            "tflops": matmul_tflops(device, dtype, matmul_n, seconds / 2),
            "gbps": copy_gbps(device, copy_bytes, seconds / 2), "flags": flags}


def roofline(flops, nbytes, seconds, ceilings):
    """Achieved TFLOP/s and GB/s of one timed call, and its share of the roofline bound (1 = at the roofline)."""
    bound = max(flops / (ceilings["tflops"] * 1e12), nbytes / (ceilings["gbps"] * 1e9))
    return {"tflops": flops / seconds / 1e12, "gbps": nbytes / seconds / 1e9, "bound_s": bound,
            "roofline_share": bound / seconds, "compute_share": flops / seconds / 1e12 / ceilings["tflops"],
            "memory_share": nbytes / seconds / 1e9 / ceilings["gbps"]}


def describe(ceilings):
    flags = ", ".join("%s=%s" % kv for kv in ceilings["flags"].items())
    return ("measured ceilings on %s: %s matmul (n=%d) %.2f TFLOP/s%s; copy of %d MiB %.1f GB/s"
            % (ceilings["device"], ceilings["dtype"], ceilings["matmul_n"], ceilings["tflops"],
               " (%s)" % flags if flags else "", ceilings["copy_bytes"] >> 20, ceilings["gbps"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                   help="CUDA: torch.backends.cuda.matmul.allow_tf32 for the float32 matmul")
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args(argv)
    if args.tf32 != "default":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    result = measure(args.device, DTYPES[args.dtype], args.seconds)
    print(describe(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
