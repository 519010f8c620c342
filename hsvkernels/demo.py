"""python -m hsvkernels demo: train a small CNN on real data, compress it with each method, compare.

The whole loop a user runs on their own model, end to end on CPU in minutes:
train -> convert_ -> accuracy before fine-tuning -> finetune (distilling from the
dense model) -> accuracy after -> latency against dense -> save/load round trip.
Data are scikit-learn's bundled digits (no download), upsampled to 32x32.
"""
import copy
import math
import os
import statistics
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import data, io
from .convert import convert_
from .finetune import accuracy, finetune

# Every method except kcp, which took 38 s to convert this net (1 thread) and ran 17x slower than
# dense at ratio 4; ask for it with --methods to see that.
DEFAULT_METHODS = ("svd", "hsv", "tucker2", "ht2", "tt_tucker", "cp")
QUICK_METHODS = ("svd", "tucker2")


class Block(nn.Module):
    """ResNet basic block: two 3x3 convs, a 1x1 projection when the shape changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem + one basic block per width (the first keeps the resolution, the others halve it).

    Widths of 32-128 give 3x3 convs with 9k-147k weights: big enough that
    factorizing them changes parameters, MACs and latency measurably.
    """

    def __init__(self, in_channels=1, num_classes=10, widths=(32, 64, 128)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def run(methods=None, *, epochs=4, ft_epochs=1, ratio=4.0, size=32, seed=0, out=None, quick=False, out_stream=None):
    """Runs the demo, prints the table; returns {"rows": [...], "reload_max_abs_diff": float}.

    quick: tiny settings (narrow net, 16x16 images, a few hundred training
    images, a few fine-tuning steps) for tests; the numbers then mean little.
    """
    import sys
    stream = out_stream or sys.stdout

    def say(*parts):
        print(*parts, file=stream, flush=True)

    methods = list(methods or (QUICK_METHODS if quick else DEFAULT_METHODS))
    widths = (16, 32, 64) if quick else (32, 64, 128)  # 16x32x3x3 = 4608 weights: still above min_params
    if quick:
        size = 16
    torch.manual_seed(seed)
    train_set, test_set = data.digits(size=size, seed=seed)
    if quick:
        train_set = Subset(train_set, range(256))
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=gen)
    test_loader = DataLoader(test_set, batch_size=128)
    max_ft_steps = 4 if quick else None

    t0 = time.perf_counter()
    dense = SmallResNet(widths=widths)
    _train(dense, train_loader, epochs=epochs, lr=3e-3)
    dense_acc = accuracy(dense, test_loader)
    say("trained %s on digits %dx%d (%d train / %d test images), %d epochs in %.1f s: test accuracy %.4f"
        % (type(dense).__name__, size, size, len(train_set), len(test_set), epochs, time.perf_counter() - t0,
           dense_acc))

    # Calibration (layer output errors) on training images; the test images stay unseen until scoring.
    calib = torch.stack([train_set[i][0] for i in range(min(64, len(train_set)))])
    bench_x = test_set.tensors[0][:32]
    dense_params, dense_macs = _count_params(dense), _conv_macs(dense, calib[:1])
    dense_ms = _latency_ms(dense, bench_x, quick)
    rows = [dict(method="dense", params=dense_params, macs=dense_macs, acc_before=dense_acc, acc_after=dense_acc,
                 latency_ratio=1.0, convert_s=0.0, factorized="-")]
    models = {}
    for method in methods:
        # Same batches for every method, so a row does not depend on which methods ran before it.
        gen.manual_seed(seed + 1)
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        try:
            report = convert_(model, method, ratio=ratio, example_input=calib, progress=False, decompose_threads=1)
        except Exception as exc:  # one method failing must not hide the others' results
            say("%s: conversion failed: %s: %s" % (method, type(exc).__name__, exc))
            continue
        convert_s = time.perf_counter() - t
        totals = report.totals()
        acc_before = accuracy(model, test_loader)
        finetune(model, train_loader, epochs=ft_epochs, lr=1e-3, teacher=dense, alpha=0.5, max_steps=max_ft_steps,
                 progress=False)
        acc_after = accuracy(model, test_loader)
        ms = _latency_ms(model, bench_x, quick)
        rows.append(dict(method=method, params=_count_params(model), macs=totals["macs_after"],
                         acc_before=acc_before, acc_after=acc_after, latency_ratio=ms / dense_ms,
                         convert_s=convert_s, factorized="%d/%d" % (totals["factorized"], totals["layers"])))
        models[method] = model
        say("%-9s converted in %.1f s, accuracy %.4f -> %.4f after fine-tuning" % (method, convert_s, acc_before,
                                                                                   acc_after))
    say()
    say(format_table(rows, ratio=ratio, dense_ms=dense_ms))

    result = {"rows": rows, "reload_max_abs_diff": None}
    if models:
        best = max(models, key=lambda m: next(r["acc_after"] for r in rows if r["method"] == m))
        result["saved_method"] = best
        result["reload_max_abs_diff"] = _save_and_reload(models[best], widths, bench_x, out, say)
    return result


def _train(model, loader, *, epochs, lr):
    """Adam + one-cycle schedule: converges in a few epochs, so the demo stays short."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _count_params(model):
    return sum(p.numel() for p in model.parameters())


def _conv_macs(model, x):
    """Conv MACs per image of a dense model (what convert_'s report counts too)."""
    macs = []

    def hook(m, args, output):
        macs.append(math.prod(m.weight.shape) // m.groups * output.shape[-2] * output.shape[-1])
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return sum(macs)


def _latency_ms(model, x, quick):
    """Median wall time of model(x) over repeated calls, after warm-up.

    The median, not the mean, because other processes on a shared machine add
    occasional long outliers.
    """
    model.eval()
    repeats = 3 if quick else 15
    with torch.no_grad():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def format_table(rows, *, ratio, dense_ms):
    header = ("method", "conv layers", "params", "conv MACs", "acc before FT", "acc after FT", "latency/dense",
              "convert s")
    lines = [header]
    for r in rows:
        lines.append((r["method"], r["factorized"], "{:,}".format(r["params"]), "{:,}".format(r["macs"]),
                      "%.4f" % r["acc_before"], "%.4f" % r["acc_after"], "%.2f" % r["latency_ratio"],
                      "%.1f" % r["convert_s"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt(line):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
    out = [fmt(lines[0]), "-" * len(fmt(lines[0]))] + [fmt(line) for line in lines[1:]]
    out.append("ratio=%g per layer; latency: whole model, batch 32, median, dense %.2f ms; "
               "conv layers = factorized/all" % (ratio, dense_ms))
    return "\n".join(out)


def _save_and_reload(model, widths, x, out, say):
    """Saves with io.save, loads into a fresh architecture with io.load, compares outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = out or os.path.join(tmp, "compressed")
        io.save(model, directory)
        reloaded = io.load(directory, model=SmallResNet(widths=widths)).eval()
        with torch.no_grad():
            diff = (reloaded(x) - model.eval()(x)).abs().max().item()
        say("saved the most accurate compressed model to %s; reloaded with io.load: max abs output difference %.3g"
            % (directory if out else "a temporary directory", diff))
    return diff
