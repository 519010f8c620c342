"""The learning-compression (LC) algorithm (Carreira-Perpinan & Idelbayev; TT-LC's training; methods.md 5.2).

    model, history = lc.train(model, loader, "tt_tucker", ratio=4, steps=20, eval_fn=score)

Compression as constrained training, min_w L(w) s.t. w = Delta(Theta), solved by an
augmented Lagrangian over the compressed conv layers:

    Theta <- Pi(w); lambda <- 0                                   (direct compression)
    for mu = mu0 * mu_growth**j, j = 0 .. steps-1:
        L-step: SGD on  L(w) + sum_l (mu/2) ||w_l - Delta(Theta_l) - lambda_l/mu||^2
        C-step: Theta_l <- Pi(w_l - lambda_l/mu)                  (hsvkernels.decompose at the chosen ranks)
        lambda_l <- lambda_l - mu (w_l - Delta(Theta_l))

Pi is the best fit in the method's format (any method of hsvkernels.decompose),
Delta rebuilds the dense kernel. While mu is small the L-steps are plain training,
so no pre-trained model is needed (TT-LC starts from random initialisation); as mu
grows, w is pulled onto the format. At the end every compressed conv becomes a
FactorizedConv2d holding the last Theta (w = Delta(Theta)); fine-tune it
afterwards with hsvkernels.finetune if wanted.

Two choices differ from the reference code: one SGD optimizer runs through all
L-steps (its momentum is not reset each step), so that an optional cyclic
learning rate (TT-LC's "exponential cyclic" schedule, torch's CyclicLR in
exp_range mode) decays over the whole run rather than restarting.
"""
import fnmatch
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ._progress import progress as progress_bar
from ._threads import single_thread
from .convert import DEFAULT_MIN_PARAMS
from .decompose import METHODS
from .decompose import decompose as _decompose
from .nn import FactorizedConv2d, _method_parameters

CLR_MODES = ("triangular", "triangular2", "exp_range")
# The penalty adds curvature mu to the L-step; SGD with Nesterov momentum 0.9 diverges on
# it once lr * mu exceeds about 1.36, so the learning rate is capped at LR_MU_CAP / mu.
LR_MU_CAP = 1.0


def _number(name, value, low, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or (low_open and value == low):
        raise ValueError("lc.train: %s must be a finite number %s %g, got %r" % (name, ">" if low_open else ">=",
                                                                                  low, value))
    return float(value)


def _count(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError("lc.train: %s must be an int >= %d, got %r" % (name, low, value))
    return value


def _targets(model, method, ratio, ranks, options, skip, min_params):
    """[(name, conv, method, decompose kwargs)] for the layers LC compresses."""
    if method not in METHODS:
        raise ValueError("lc.train: unknown method %r; expected one of: %s" % (method, ", ".join(sorted(METHODS))))
    if (ratio is None) == (ranks is None):
        raise ValueError("lc.train: give ratio= or ranks= (one of them)")
    if ratio is not None:
        _number("ratio", ratio, 1)
    if options is not None and not isinstance(options, dict):
        raise TypeError("lc.train: options must be a dict of decompose arguments, got %r" % (options,))
    options = dict(options or {})
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    ranks = getattr(ranks, "plan", ranks)      # a BayesOptResult carries its plan
    if isinstance(ranks, dict):                # per layer: a Plan of Choices, or name -> rank
        out = []
        for name, spec in ranks.items():
            if name not in convs:
                raise ValueError("lc.train: ranks names layer %r, which is not an nn.Conv2d of the model" % (name,))
            if hasattr(spec, "method") and hasattr(spec, "config"):      # a ranks.Choice
                if spec.method == "dense":
                    continue
                out.append((name, convs[name], spec.method, dict(options, **spec.config)))
            else:
                out.append((name, convs[name], method, dict(options, rank=spec)))
        return out
    kwargs = dict(options, **({"ratio": ratio} if ratio is not None else {"rank": ranks}))
    out = []
    for name, conv in convs.items():
        if conv.groups != 1 or conv.weight.numel() < min_params:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            continue
        out.append((name, conv, method, dict(kwargs)))
    return out


def _scheduler(optimizer, clr, lr, batches_per_step, total_batches):
    """torch's CyclicLR for clr = mode or (mode, {CyclicLR arguments}); None: a constant lr."""
    if clr is None:
        return None
    mode, overrides = None, None
    if isinstance(clr, str):
        mode, overrides = clr, {}
    elif isinstance(clr, (tuple, list)) and len(clr) == 2:
        mode, overrides = clr
    if mode not in CLR_MODES or not isinstance(overrides, dict):
        raise ValueError("lc.train: clr must be None, a CyclicLR mode %s or (mode, {arguments}), got %r"
                         % (CLR_MODES, clr))
    # Defaults: one cycle per LC step between lr/10 and lr; in exp_range mode the
    # amplitude decays to a tenth over the whole run.
    args = dict(base_lr=lr / 10, max_lr=lr, step_size_up=max(1, batches_per_step // 2), mode=mode,
                gamma=0.1 ** (1.0 / max(total_batches, 1)), cycle_momentum=False)
    args.update(overrides)
    return torch.optim.lr_scheduler.CyclicLR(optimizer, **args)


class _Layer:
    """One compressed conv: its weight w, its factors Theta, Delta(Theta) and the multipliers lambda."""

    def __init__(self, name, conv, method, kwargs):
        if "stride" in _method_parameters(method) and "stride" not in kwargs:
            kwargs = dict(kwargs, stride=conv.stride)   # as FactorizedConv2d.from_conv: MACs at the real stride
        self.name, self.conv, self.method, self.kwargs = name, conv, method, kwargs
        self.lam = torch.zeros_like(conv.weight, dtype=torch.float64)
        self.fact = self.approx = None

    def c_step(self, mu):
        w = self.conv.weight.detach()
        shifted = w.double() - self.lam / mu if mu > 0 else w
        try:
            self.fact = _decompose(shifted.to(w.dtype), self.method, **self.kwargs)
        except Exception as exc:
            raise ValueError("lc.train: C-step of layer %r (%s, %s) failed: %s"
                             % (self.name, self.method, self.kwargs, exc)) from exc
        self.approx = self.fact.to_dense().detach().to(dtype=w.dtype, device=w.device)
        if mu > 0:
            self.lam -= mu * (w.double() - self.approx.double())

    def penalty_target(self, mu):
        """Delta(Theta) + lambda/mu: what w is pulled towards in the L-step."""
        return (self.approx.double() + self.lam / mu).to(self.conv.weight.dtype)

    def violation_sq(self):
        return (self.conv.weight.detach().double() - self.approx.double()).square().sum().item()


def _batch_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recalibrate_bn(model, loader, batches, device=None):
    """Re-estimates the BatchNorm running statistics of `model` from up to `batches` batches of loader.

    Running statistics that were accumulated with other weights (the dense w, or
    weights that moved fast under a large penalty) misjudge the activations of
    Delta(Theta); a forward pass in train mode without gradients, averaging
    (momentum None), gives the ones that belong to the current weights.
    """
    norms = _batch_norms(model)
    if not norms or batches <= 0:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        with torch.no_grad():
            for i, (x, _) in enumerate(loader):
                if i >= batches:
                    break
                model(x.to(device) if device is not None else x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


def _evaluate(model, layers, eval_fn, loader, bn_batches, device, compressed):
    """eval_fn(model), with every compressed weight replaced by Delta(Theta) if `compressed`,
    after re-estimating the BatchNorm statistics; the weights and statistics are restored after."""
    saved = [(layer.conv.weight, layer.conv.weight.detach().clone()) for layer in layers] if compressed else []
    buffers = [(b, b.detach().clone()) for m in _batch_norms(model) for b in m.buffers()] if bn_batches else []
    was_training = model.training
    try:
        with torch.no_grad():
            for layer in (layers if compressed else []):
                layer.conv.weight.copy_(layer.approx)
        recalibrate_bn(model, loader, bn_batches, device)
        return float(eval_fn(model))
    finally:
        with torch.no_grad():
            for w, value in saved + buffers:
                w.copy_(value)
        model.train(was_training)


def _replace(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def train(model, loader, method="tt_tucker", *, ratio=None, ranks=None, options=None, mu0=1e-3, mu_growth=1.25,
          steps=20, epochs_per_step=1, lr=0.05, momentum=0.9, weight_decay=0.0, clr=None, loss_fn=None, skip=(),
          min_params=DEFAULT_MIN_PARAMS, bn_batches=20, seed=0, progress=True, eval_fn=None, eval_dense=False):
    """Trains and compresses `model` with LC; returns (the converted model, history).

    loader: (input, label) batches; the model is trained on loss_fn(model(x), y)
        (default cross-entropy) on the device of its parameters.
    method: a hsvkernels.decompose method; its projection is the C-step.
    ratio: per-layer parameter compression (decompose's ratio=), or
    ranks: decompose's rank= for every layer, a dict {layer name: rank}, or a
        ranks.Plan / bayes_opt result (their layers and configurations).
    options: further decompose arguments for every layer (e.g. {"iters": 2}).
    skip, min_params: with ratio= or a single rank, the nn.Conv2d layers (groups
        1) matching no skip pattern and with at least min_params weights are compressed.
    mu0, mu_growth, steps: the penalty schedule mu_j = mu0 * mu_growth**j.
    epochs_per_step: passes over loader per L-step.
    lr, momentum, weight_decay: SGD (nesterov when momentum > 0); the learning
        rate is capped at 1/mu, beyond which the penalty makes SGD diverge.
    clr: None (constant lr), a CyclicLR mode ("exp_range", "triangular",
        "triangular2") or (mode, {CyclicLR arguments}); defaults: base_lr=lr/10,
        max_lr=lr, one cycle per LC step, exp_range gamma decaying the amplitude
        to a tenth over the run.
    bn_batches: BatchNorm statistics are re-estimated (recalibrate_bn) from this
        many training batches for every evaluation and for the final model,
        since those of w misjudge Delta(Theta); 0 keeps them as trained.
    seed: seeds torch's global random generator (initial shuffles, dropout).
    eval_fn(model) -> float: scores the compressed model Delta(Theta) after each
        C-step (e.g. test accuracy); eval_dense also scores the trained weights w.

    history: one dict per C-step: step 0 is the direct compression of the initial
    weights, steps 1..steps the LC iterations: {"step", "mu", "lr" (mean over the step), "loss" and
    "task_loss" (mean over the step's batches; None at step 0), "violation"
    (||w - Delta(Theta)|| over the compressed layers), "rel_violation"
    (divided by ||w||), "accuracy" (eval_fn of Delta(Theta), or None),
    "dense_accuracy" (with eval_dense), "seconds" (since the start)}.
    The model is converted in place and left in eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError("lc.train: model must be an nn.Module, got %s" % type(model).__name__)
    mu0 = _number("mu0", mu0, 0, low_open=True)
    mu_growth = _number("mu_growth", mu_growth, 1)
    steps = _count("steps", steps, 1)
    epochs_per_step = _count("epochs_per_step", epochs_per_step, 1)
    lr = _number("lr", lr, 0, low_open=True)
    momentum = _number("momentum", momentum, 0)
    weight_decay = _number("weight_decay", weight_decay, 0)
    _count("min_params", min_params, 0)
    _count("bn_batches", bn_batches, 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError("lc.train: seed must be an int, got %r" % (seed,))
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError("lc.train: eval_fn must be a callable eval_fn(model) -> float, got %r" % (eval_fn,))
    if isinstance(skip, str):
        skip = (skip,)
    try:
        batches = len(loader)
    except TypeError:
        raise TypeError("lc.train: loader must be a sized iterable of (input, label) batches (e.g. a DataLoader)") \
            from None
    if batches == 0:
        raise ValueError("lc.train: loader yields no batches")
    loss_fn = loss_fn or F.cross_entropy
    layers = [_Layer(*t) for t in _targets(model, method, ratio, ranks, options, skip, min_params)]
    if not layers:
        raise ValueError("lc.train: no layer to compress (nn.Conv2d with groups 1 and >= min_params=%d weights, "
                         "not skipped)" % min_params)

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=momentum > 0,
                                weight_decay=weight_decay)
    scheduler = _scheduler(optimizer, clr, lr, batches * epochs_per_step, batches * epochs_per_step * steps)
    start = time.perf_counter()
    history = []

    def record(step, mu, losses, task_losses, lrs):
        with torch.no_grad(), single_thread():
            for layer in layers:
                layer.c_step(mu)
        violation_sq = sum(layer.violation_sq() for layer in layers)
        norm_sq = sum(layer.conv.weight.detach().double().square().sum().item() for layer in layers)
        entry = {"step": step, "mu": mu, "lr": sum(lrs) / len(lrs) if lrs else lr,
                 "loss": sum(losses) / len(losses) if losses else None,
                 "task_loss": sum(task_losses) / len(task_losses) if task_losses else None,
                 "violation": math.sqrt(violation_sq), "rel_violation": math.sqrt(violation_sq / max(norm_sq, 1e-300)),
                 "accuracy": None}
        if eval_fn is not None:
            entry["accuracy"] = _evaluate(model, layers, eval_fn, loader, bn_batches, device, compressed=True)
            if eval_dense:
                entry["dense_accuracy"] = _evaluate(model, layers, eval_fn, loader, bn_batches, device, False)
        entry["seconds"] = time.perf_counter() - start
        history.append(entry)
        return entry

    record(0, 0.0, [], [], [])                      # Theta <- Pi(w), lambda <- 0
    bar = progress_bar(range(1, steps + 1), progress, "lc.train (%s)" % method, "step")
    for step in bar:
        mu = mu0 * mu_growth ** (step - 1)
        targets = [layer.penalty_target(mu) for layer in layers]
        weights = [layer.conv.weight for layer in layers]
        losses, task_losses, lrs = [], [], []
        model.train()
        for _ in range(epochs_per_step):
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                task = loss_fn(model(x), y)
                penalty = sum((w - t).square().sum() for w, t in zip(weights, targets))
                loss = task + 0.5 * mu * penalty
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                scheduled = [group["lr"] for group in optimizer.param_groups]
                for group in optimizer.param_groups:
                    group["lr"] = min(group["lr"], LR_MU_CAP / mu)
                lrs.append(optimizer.param_groups[0]["lr"])
                optimizer.step()
                for group, value in zip(optimizer.param_groups, scheduled):
                    group["lr"] = value
                if scheduler is not None:
                    scheduler.step()
                losses.append(loss.item())
                task_losses.append(task.item())
        entry = record(step, mu, losses, task_losses, lrs)
        if hasattr(bar, "set_postfix"):
            shown = {"mu": "%.3g" % mu, "loss": "%.3f" % entry["loss"], "viol": "%.3g" % entry["rel_violation"]}
            if entry["accuracy"] is not None:
                shown["acc"] = "%.3f" % entry["accuracy"]
            bar.set_postfix(shown)

    for layer in layers:                        # w <- Delta(Theta): the factors replace the conv
        conv = layer.conv
        fact = layer.fact.to(dtype=conv.weight.dtype, device=conv.weight.device)
        bias = None if conv.bias is None else conv.bias.detach()
        _replace(model, layer.name, FactorizedConv2d(fact, conv.stride, conv.padding, conv.dilation, bias,
                                                     conv.padding_mode))
    recalibrate_bn(model, loader, bn_batches, device)
    model.eval()
    return model, history
