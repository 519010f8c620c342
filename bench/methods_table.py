"""Compression table: every conv of ResNet-18, each method, parameter ratios 2x/4x/8x.

For each weight family and method, every distinct ResNet-18 conv shape (weighted
by how often the model uses it) is decomposed with decompose(..., ratio=r); the
table gives the achieved parameter and MAC reduction over all convs, the mean
relative reconstruction error ||W - W_hat|| / ||W|| over layers, and the median
op/dense latency ratio over layers (torch.ops.hsv.conv2d vs F.conv2d, one
process, interleaved timing). Layers a method cannot reach at r stay dense and
are counted.

Weight families (no trained weights can be downloaded here):
  random      torchvision's default init (kaiming-uniform, a=sqrt(5)): no structure,
              the hardest case for every method.
  structured  a sum of rank-one terms a_k(t) b_k(s) g_k(i, j) with strengths
              decaying as 1/k, smooth (Gaussian) spatial profiles g_k and 5% noise:
              decaying spectra and smooth filters, as trained kernels have, without
              favouring any one format.

Methods: svd; hsv (2-level, automatic split); hsv-h (hierarchical:
decompose(..., "hsv", level2="auto"), the least-error of the 2-level form and
milder 2-level forms whose merged factors get level-2 ranks q1/q2 to meet r); kcp;
and any other method of hsvkernels.decompose that takes ratio=.

  python bench/methods_table.py --ratios 2,4,8 --batch 8 --out bench/results/methods-cpu
"""
import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hsvkernels  # noqa: E402
from hsvkernels import _host_malloc  # noqa: E402
from bench import suite, timing  # noqa: E402


def structured_weight(shape, gen):
    cout, cin, kh, kw = shape
    terms = min(cout, cin * kh * kw)
    ii = torch.arange(kh, dtype=torch.float64)[:, None]
    jj = torch.arange(kw, dtype=torch.float64)[None, :]
    w = torch.zeros(shape, dtype=torch.float64)
    a = torch.randn(terms, cout, generator=gen, dtype=torch.float64)
    b = torch.randn(terms, cin, generator=gen, dtype=torch.float64)
    centers = torch.rand(terms, 2, generator=gen, dtype=torch.float64)
    for k in range(terms):
        ci, cj = centers[k, 0] * (kh - 1), centers[k, 1] * (kw - 1)
        g = torch.exp(-((ii - ci) ** 2 + (jj - cj) ** 2) / 2.0)
        w += (1.0 / (k + 1)) * a[k][:, None, None, None] * b[k][None, :, None, None] * g
    w /= w.norm()
    w += 0.05 * torch.randn(shape, generator=gen, dtype=torch.float64) / math.prod(shape) ** 0.5
    return w.float()


def random_weight(shape, gen):
    w = torch.empty(shape)
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))  # kaiming_uniform(a=sqrt(5)) as nn.Conv2d initialises
    return w.uniform_(-bound, bound, generator=gen)


def factorize(method, weight, ratio, stride, cp_iters=None):
    if method == "cp" and cp_iters is not None:  # CP-ALS at R ~ 1000 costs minutes per layer at the default 500 sweeps
        return hsvkernels.decompose(weight, method, ratio=ratio, iters=cp_iters)
    if method == "hsv-h":  # the library's own search over 2-level and level-2 layouts
        return hsvkernels.decompose(weight, "hsv", ratio=ratio, level2="auto")
    if method == "kcp":  # its first stages run at the input resolution: its MAC guard needs the stride
        return hsvkernels.decompose(weight, method, ratio=ratio, stride=stride)
    return hsvkernels.decompose(weight, method, ratio=ratio)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="svd,hsv,hsv-h,kcp")
    ap.add_argument("--ratios", default="2,4,8")
    ap.add_argument("--families", default="random,structured")
    ap.add_argument("--batch", type=int, default=8, help="batch for the latency ratio (0: no timing)")
    ap.add_argument("--min-run-time", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cp-iters", type=int, default=None, help="CP-ALS sweeps for method cp (default: the library's)")
    ap.add_argument("--out", default=None, help="path without extension for .json and .md")
    _host_malloc.add_argument(ap)
    args = ap.parse_args(argv)
    _host_malloc.configure(args.host_malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = suite.select(models=["resnet18"])
    counts = {s.name: sum(1 for u in s.uses if u.startswith("resnet18.")) for s in layers}
    env = timing.environment("cpu")
    rows = []
    for family in args.families.split(","):
        gen = torch.Generator().manual_seed(0)
        weights = {s.name: (structured_weight if family == "structured" else random_weight)(s.weight_shape, gen)
                   for s in layers}
        for method in args.methods.split(","):
            for ratio in [float(r) for r in args.ratios.split(",")]:
                params = macs = dense_params = dense_macs = 0
                errors, latency, dense_layers = [], [], []
                for s in layers:
                    n = counts[s.name]
                    w = weights[s.name]
                    ho, wo = s.out_hw
                    dense_params += n * s.dense_params
                    dense_macs += n * s.dense_macs()
                    try:
                        fact = factorize(method, w, ratio, s.stride, args.cp_iters)
                    except ValueError:
                        dense_layers.append(s.name)
                        params += n * s.dense_params
                        macs += n * s.dense_macs()
                        continue
                    params += n * fact.num_params()
                    macs += n * fact.macs(ho, wo, s.h, s.w)
                    errors.append(fact.relative_error(w))
                    if args.batch:
                        x = torch.randn(args.batch, s.cin, s.h, s.w)
                        kw = dict(stride=s.stride, padding=s.padding, dilation=s.dilation)
                        dense_w = fact.to_dense()
                        y = hsvkernels.conv2d(x, fact, None, **kw)
                        assert torch.allclose(y, F.conv2d(x, dense_w, None, **kw), rtol=1e-3, atol=1e-3)
                        t = timing.time_interleaved(
                            {"dense": lambda: F.conv2d(x, w, None, **kw),
                             "op": lambda: hsvkernels.conv2d(x, fact, None, **kw)},
                            min_run_time=args.min_run_time)
                        latency.append(t["op"]["median"] / t["dense"]["median"])
                row = dict(family=family, method=method, ratio=ratio, params_x=dense_params / params,
                           macs_x=dense_macs / macs, mean_rel_err=statistics.fmean(errors) if errors else None,
                           latency_op_over_dense=statistics.median(latency) if latency else None,
                           dense_layers=dense_layers)
                rows.append(row)
                print("%-10s %-6s %4.0fx  params %5.2fx  MACs %5.2fx  err %s  op/dense %s  dense: %s" % (
                    family, method, ratio, row["params_x"], row["macs_x"],
                    "%.3f" % row["mean_rel_err"] if errors else "-",
                    "%.2f" % row["latency_op_over_dense"] if latency else "-", len(dense_layers)), flush=True)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"env": env, "batch": args.batch, "rows": rows}, f, indent=1, default=str)
        with open(args.out + ".md", "w") as f:
            f.write("ResNet-18 convs (%d distinct shapes). %s threads, batch %d, fp32. Command: `%s`\n\n"
                    % (len(layers), torch.get_num_threads(), args.batch, " ".join(sys.argv)))
            f.write("| weights | method | target | params x | MACs x | mean rel. error | op/dense (median) | "
                    "layers left dense |\n|---|---|---|---|---|---|---|---|\n")
            for r in rows:
                f.write("| %s | %s | %gx | %.2f | %.2f | %s | %s | %d |\n" % (
                    r["family"], r["method"], r["ratio"], r["params_x"], r["macs_x"],
                    "%.3f" % r["mean_rel_err"] if r["mean_rel_err"] is not None else "-",
                    "%.2f" % r["latency_op_over_dense"] if r["latency_op_over_dense"] is not None else "-",
                    len(r["dense_layers"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
