"""LC (learning-compression) training on digits from random init: the accuracy curve per LC step.

Trains the demo's SmallResNet with hsvkernels.lc.train (no pre-training), and after
every C-step records mu, the mean training loss of the L-step, the relative
constraint violation ||w - Delta(Theta)|| / ||w|| and the test accuracy of the
compressed model Delta(Theta) (and of the dense weights w). For reference it also
trains the same net densely with the same SGD for the same number of epochs,
compresses it directly (one decomposition per layer, BatchNorm re-estimated, no
fine-tuning) and scores that: the "direct compression" baseline of the LC papers.

Writes bench/results/lc-digits-<method>.md, .json and .png (the curve), with the
command and the machine in the files.

  python bench/lc_digits.py --method tt_tucker --steps 20
  python bench/lc_digits.py --method svd --clr exp_range --out bench/results/lc-digits-svd-clr
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hsvkernels  # noqa: E402
from bench import timing  # noqa: E402
from hsvkernels import FactorizedConv2d, data, lc  # noqa: E402
from hsvkernels.demo import SmallResNet  # noqa: E402
from hsvkernels.finetune import accuracy  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="tt_tucker", choices=sorted(hsvkernels.METHODS))
    p.add_argument("--ratio", type=float, default=4.0, help="per-layer parameter compression")
    p.add_argument("--steps", type=int, default=20, help="LC steps (one L-step and one C-step each)")
    p.add_argument("--epochs-per-step", type=int, default=1)
    p.add_argument("--mu0", type=float, default=5e-3)
    p.add_argument("--mu-growth", type=float, default=1.4)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--clr", default=None, choices=lc.CLR_MODES, help="cyclic learning rate mode (default: constant)")
    p.add_argument("--size", type=int, default=16, help="image size (digits are upsampled from 8x8)")
    p.add_argument("--widths", default="32,64,128")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--min-params", type=int, default=1000, help="convs with fewer weights stay dense")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the direct-compression baseline")
    p.add_argument("--note", default="", help="a line about the machine state, written into the .md")
    p.add_argument("--out", default=None, help="output path without extension "
                                              "(default bench/results/lc-digits-<method>)")
    return p.parse_args(argv)


def direct_compression(args, train_set, test_loader, widths):
    """The same SGD for the same epochs on the dense net, then one decomposition per layer."""
    torch.manual_seed(args.seed)
    model = SmallResNet(widths=widths)
    loader = DataLoader(train_set, batch_size=args.batch, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    model.train()
    for _ in range(args.steps * args.epochs_per_step):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    dense_acc = accuracy(model, test_loader)
    for name, conv in list(model.named_modules()):
        if isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.weight.numel() >= args.min_params:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    FactorizedConv2d.from_conv(conv, args.method, ratio=args.ratio))
    before_bn = accuracy(model, test_loader)
    lc.recalibrate_bn(model, loader, 20)
    return {"dense_accuracy": dense_acc, "direct_accuracy_stale_bn": before_bn,
            "direct_accuracy": accuracy(model, test_loader), "params": sum(p.numel() for p in model.parameters())}


def markdown(args, env, history, summary, baseline, png_name):
    lines = ["# LC training on digits from random init: %s, ratio %g" % (args.method, args.ratio), "",
             "Command: `%s`  " % env["command"],
             "Machine: %s, %d CPUs visible, torch %d thread(s); torch %s; hsvkernels at git %s; %s UTC; "
             "total %.0f s." % (env["cpu_model"], env["cpu_count"], env["threads"], env["torch"],
                                env["git_commit"], env["date_utc"], summary["seconds"])
             + (" " + args.note if args.note else ""), "",
             "SmallResNet widths %s on digits %dx%d (1,437 train / 360 test), batch %d; SGD lr %g, Nesterov momentum "
             "0.9, %s; mu_j = %g * %g^j for j = 0..%d, %d epoch(s) per L-step. Convs with >= %d weights are "
             "compressed (%d of %d); accuracy of Delta(Theta) is measured with BatchNorm statistics re-estimated "
             "on 20 training batches."
             % (args.widths, args.size, args.size, args.batch, args.lr,
                "cyclic lr (%s)" % args.clr if args.clr else "constant lr (capped at 1/mu)", args.mu0, args.mu_growth,
                args.steps - 1, args.epochs_per_step, args.min_params, summary["compressed_layers"],
                summary["conv_layers"]), "",
             "| LC step | mu | lr (mean) | train loss | task loss | rel. violation | test acc Delta(Theta) | "
             "test acc w | s |", "|---|---|---|---|---|---|---|---|---|"]
    for h in history:
        fmt = lambda v, f: "-" if v is None else f % v  # noqa: E731
        lines.append("| %d | %s | %s | %s | %s | %.4f | %.4f | %s | %.0f |" % (
            h["step"], fmt(h["mu"] or None, "%.3g"), fmt(h["lr"] if h["step"] else None, "%.3g"),
            fmt(h["loss"], "%.4f"), fmt(h["task_loss"], "%.4f"), h["rel_violation"], h["accuracy"],
            fmt(h.get("dense_accuracy"), "%.4f"), h["seconds"]))
    lines += ["", "Step 0 is the direct compression of the random initial weights (Theta <- Pi(w), lambda <- 0).",
              "", "**Final converted model** (FactorizedConv2d layers, BN re-estimated): test accuracy %.4f, "
              "%s parameters (dense %s, %.2fx overall; %.2fx over the compressed convs)."
              % (summary["final_accuracy"], "{:,}".format(summary["params"]), "{:,}".format(summary["dense_params"]),
                 summary["dense_params"] / summary["params"], summary["conv_compression"])]
    if baseline:
        lines += ["", "**Direct-compression baseline**, same budget: the dense net trained with the same SGD for "
                  "%d epochs reaches %.4f; decomposed with %s at ratio %g it scores %.4f (%.4f before re-estimating "
                  "BN), without fine-tuning." % (args.steps * args.epochs_per_step, baseline["dense_accuracy"],
                                                 args.method, args.ratio, baseline["direct_accuracy"],
                                                 baseline["direct_accuracy_stale_bn"])]
    lines += ["", "![accuracy curve](%s)" % png_name, ""]
    return "\n".join(lines)


def plot(history, baseline, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(steps, [h["accuracy"] for h in history], "o-", label="Delta(Theta) (compressed)")
    if "dense_accuracy" in history[0]:
        ax[0].plot(steps, [h["dense_accuracy"] for h in history], "s--", label="w (dense weights)")
    if baseline:
        ax[0].axhline(baseline["direct_accuracy"], color="gray", linestyle=":", label="direct compression, same budget")
    ax[0].set_xlabel("LC step")
    ax[0].set_ylabel("test accuracy")
    ax[0].set_ylim(0, 1.02)
    ax[0].legend(loc="lower right")
    ax[0].grid(alpha=0.3)
    ax[1].semilogy(steps[1:], [h["mu"] for h in history[1:]], "o-", label="mu")
    ax[1].semilogy(steps, [h["rel_violation"] for h in history], "s-", label="||w - Delta(Theta)|| / ||w||")
    ax[1].semilogy(steps[1:], [h["task_loss"] for h in history[1:]], "^-", label="train task loss")
    ax[1].set_xlabel("LC step")
    ax[1].legend()
    ax[1].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    widths = tuple(int(w) for w in args.widths.split(","))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lc-digits-%s" % args.method)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    env = timing.environment()

    train_set, test_set = data.digits(size=args.size, seed=args.seed)
    test_loader = DataLoader(test_set, batch_size=360)
    train_loader = DataLoader(train_set, batch_size=args.batch, shuffle=True,
                              generator=torch.Generator().manual_seed(args.seed))
    torch.manual_seed(args.seed)
    model = SmallResNet(widths=widths)
    dense_params = sum(p.numel() for p in model.parameters())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    start = time.perf_counter()
    model, history = lc.train(model, train_loader, args.method, ratio=args.ratio, steps=args.steps,
                              epochs_per_step=args.epochs_per_step, mu0=args.mu0, mu_growth=args.mu_growth,
                              lr=args.lr, clr=args.clr, min_params=args.min_params, seed=args.seed,
                              eval_fn=lambda m: accuracy(m, test_loader), eval_dense=True)
    factorized = [m for m in model.modules() if isinstance(m, FactorizedConv2d)]
    summary = {"final_accuracy": accuracy(model, test_loader), "params": sum(p.numel() for p in model.parameters()),
               "dense_params": dense_params, "compressed_layers": len(factorized), "conv_layers": len(convs),
               "conv_compression": sum(m.factorization.dense_params() for m in factorized)
               / sum(m.factorization.num_params() for m in factorized),
               "lc_seconds": time.perf_counter() - start}
    for h in history:
        print("step %2d  mu %-8.3g loss %-8s viol %.4f  acc %.4f  dense %.4f  %.0f s"
              % (h["step"], h["mu"], "-" if h["loss"] is None else "%.4f" % h["loss"], h["rel_violation"],
                 h["accuracy"], h["dense_accuracy"], h["seconds"]), flush=True)
    baseline = None if args.no_baseline else direct_compression(args, train_set, test_loader, widths)
    summary["seconds"] = time.perf_counter() - start
    print("final %.4f; baseline %s" % (summary["final_accuracy"], baseline))

    png = out + ".png"
    plot(history, baseline, png, "LC on digits, %s ratio %g, from random init" % (args.method, args.ratio))
    with open(out + ".md", "w") as f:
        f.write(markdown(args, env, history, summary, baseline, os.path.basename(png)))
    with open(out + ".json", "w") as f:
        json.dump({"args": vars(args), "environment": env, "history": history, "summary": summary,
                   "baseline": baseline}, f, indent=1, default=str)
    print("wrote %s.{md,json,png}" % out)


if __name__ == "__main__":
    main()
