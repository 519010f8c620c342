"""CPU timing of factorized convs with few input channels (RGB stems): the fused path with pixels as the
vector axis (csrc/ops/cpu/im2col_panels.cpp), the general fused kernel (HSV_CPU_IM2COL_PANELS=off), the
composite chain and dense F.conv2d, interleaved in one process (bench/timing.py), medians.

Random SVD factors (V: r x Cin x kh x kw, U: Cout x r) at the ranks HSV picks at 4x for the two stems
below, or with --grid over a grid of shapes and ranks (the grid that set im2col_panels.cpp's channel bounds).

    python bench/cpu_few_channels.py --threads 1,2 --batch 1,8 [--channels-last] [--grid] [--out PATH]
"""
import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hsvkernels import _host_malloc  # noqa: E402  (importing hsvkernels registers torch.ops.hsv)
from bench import timing  # noqa: E402

# name, Cin, Cout, input size, kernel, stride, padding, rank
STEMS = [("resnet conv1 (7x7/2)", 3, 64, 224, 7, 2, 3, 11),
         ("3->64 3x3 (vgg16.features.0 shape)", 3, 64, 224, 3, 1, 1, 4)]


def grid():
    """The shape grid: Cin 3 and 8, Cout 16 and 64, rank 3-16, 3x3 and 7x7/2, stride 1 and 2, 56 and 224."""
    for cin, cout, r, k, s, hw in itertools.product([3, 8], [16, 64], [3, 4, 8, 11, 16], [3, 7], [1, 2], [56, 224]):
        if k == 7 and s == 1:
            continue
        yield ("grid", cin, cout, hw, k, s, k // 2, r)


def env_path(fn, **env):
    """fn with the HSV_* variables in env set around each call."""
    def run():
        with timing.env_set(env):
            return fn()
    return run


def time_layer(layer, batch, channels_last, min_run_time):
    name, cin, cout, hw, k, s, pad, r = layer
    v = torch.randn(r, cin, k, k) / (cin * k * k) ** 0.5
    u = torch.randn(cout, r) / r ** 0.5
    x = torch.randn(batch, cin, hw, hw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (u @ v.flatten(1)).view(cout, cin, k, k)
    op = lambda: torch.ops.hsv.conv2d(x, [v, u], None, [s, s], [pad, pad], [1, 1], 1, "svd")  # noqa: E731
    paths = {"panels": env_path(op, HSV_CPU_IMPL="fused", HSV_CPU_IM2COL_PANELS="on"),
             "general": env_path(op, HSV_CPU_IMPL="fused", HSV_CPU_IM2COL_PANELS="off"),
             "composite": env_path(op, HSV_CPU_IMPL="composite"),
             "dense": lambda: F.conv2d(x, w, None, s, pad)}
    ref = paths["dense"]()
    for path, fn in paths.items():  # every path computes the same conv
        err = ((fn() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-4, (name, path, err)
    ms = {p: 1e3 * t["median"] for p, t in timing.time_interleaved(paths, min_run_time=min_run_time).items()}
    return dict(layer=name, cin=cin, cout=cout, size=hw, kernel=k, stride=s, rank=r, batch=batch,
                channels_last=channels_last, threads=torch.get_num_threads(), ms=ms,
                panels_over_general=ms["panels"] / ms["general"], panels_over_dense=ms["panels"] / ms["dense"],
                general_over_dense=ms["general"] / ms["dense"], composite_over_dense=ms["composite"] / ms["dense"])


def table(rows):
    head = ("| layer | Cin | Cout | size | k/s | r | batch | threads | layout | panels ms | general ms | composite ms "
            "| dense ms | panels / general | panels / dense | general / dense | composite / dense |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        m = r["ms"]
        lines.append("| %s | %d | %d | %d | %d/%d | %d | %d | %d | %s | %.3f | %.3f | %.3f | %.3f | %.2f | %.2f | %.2f "
                     "| %.2f |" % (r["layer"], r["cin"], r["cout"], r["size"], r["kernel"], r["stride"], r["rank"],
                                   r["batch"], r["threads"], "NHWC" if r["channels_last"] else "NCHW", m["panels"],
                                   m["general"], m["composite"], m["dense"], r["panels_over_general"],
                                   r["panels_over_dense"], r["general_over_dense"], r["composite_over_dense"]))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--grid", action="store_true", help="the shape grid instead of the two stems")
    ap.add_argument("--input-size", type=int, default=None, help="the stems' input size (default 224)")
    ap.add_argument("--min-run-time", type=float, default=0.3, help="seconds of timing per path and row")
    ap.add_argument("--out", default=None, help="path without extension: writes .md and .json")
    _host_malloc.add_argument(ap)
    args = ap.parse_args(argv)
    _host_malloc.configure(args.host_malloc)
    env = timing.environment("cpu")
    header = timing.describe_environment(env)
    print("\n".join(header))
    torch.manual_seed(0)
    layers = list(grid()) if args.grid else STEMS
    if args.input_size and not args.grid:
        layers = [(name, cin, cout, args.input_size, *rest) for name, cin, cout, _, *rest in layers]
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for batch in [int(b) for b in args.batch.split(",")]:
            for layer in layers:
                if args.grid and batch > 1 and layer[3] == 224 and layer[5] == 1:
                    continue  # the grid's largest problems: batch 1 only
                rows.append(time_layer(layer, batch, args.channels_last, args.min_run_time))
                print(table(rows[-1:])[-1], flush=True)
    lines = table(rows)
    if args.grid:
        ratios = sorted(r["panels_over_general"] for r in rows)
        lines.append("")
        lines.append("panels / general over %d rows: min %.2f, median %.2f, max %.2f"
                     % (len(ratios), ratios[0], ratios[len(ratios) // 2], ratios[-1]))
    print("\n".join(lines[-1:] if args.grid else []))
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write("Convs with few input channels, CPU fp32, interleaved medians; panels = the fused path with "
                    "pixels as the vector axis (im2col_panels.cpp), general = the same with "
                    "HSV_CPU_IM2COL_PANELS=off.\n\n```\n" + "\n".join(header) + "\n```\n\n" + "\n".join(lines) + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
