"""Bayesian-optimisation rank selection around the EVBMF ranks (TT-LC's "double Bayesian" step).

    result = ranks.bayes_opt(model, "tt_tucker", calibration=batch, lam=0.1, n_trials=30)
    ranks.apply(model, result.plan)            # or convert_(model, "tt_tucker", overrides=result.overrides())

methods.md 5.4: EVBMF of the channel unfoldings (and of the TT core) gives each
layer's ranks r_evb; a Gaussian-process surrogate with expected improvement then
searches multipliers beta in `bounds` (default [0.25, 2]) on those ranks,
r = clamp(round(beta * r_evb)), to minimise

    f = error + lam * (compressed cost / dense cost)          (cost: "params" or "macs")

error: the relative squared error of the model output on the calibration batch
with every selected layer replaced by its decomposition at r (for a list of
weights: the relative squared weight error over all layers). Or the user's
`objective(plan) -> float` (e.g. validation error after a short fine-tune).
The search runs over log2(beta), starts at the EVBMF point (beta = 1), takes
`n_initial` random points, then one EI-maximising point per trial; each distinct
rank configuration is evaluated once (a cache), so the objective is called at
most n_trials times. Search spaces (`per`): "stage" (one beta per rank slot,
shared by the layers: 2-3 dimensions), "layer" (one beta per layer, for all its
slots) or "global" (one beta). EVBMF needs weights with a decaying spectrum: on
random or barely trained weights it gives ranks near 1 and the multipliers cannot
reach useful ranks, so search on a trained model.

Library: bayesian-optimization (import name bayes_opt), an optional dependency
(`pip install hsvkernels[bayes]`). Of the three the issue named, checked here with
numpy 2.4 / scipy 1.17 / scikit-learn 1.9 (all three ran a seeded 2-D GP-EI search):
  * bayesian-optimization 3.4.0 (released 2026-10): a scikit-learn GP with the
    Matern-5/2 kernel and a plain expected-improvement acquisition, i.e. exactly
    what methods.md 5.4 asks for; an ask/tell API (suggest/register); deterministic
    under random_state; needs only numpy, scipy, scikit-learn (already used here)
    and colorama.
  * optuna 5.0.0 (2026-09): well maintained too, but its GPSampler maximises
    log-EI and the package pulls in SQLAlchemy, Alembic, PyYAML and colorlog for
    its storage layer, none of which this library needs.
  * scikit-optimize 0.10.2: last release 2024-06 and no longer developed; it
    still ran here, but a dependency nobody maintains is a liability.
"""
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ._threads import single_thread
from .decompose import decompose as _decompose
from .decompose import ht2 as _ht2
from .decompose import tt_tucker as _tt_tucker
from .decompose import tucker2 as _tucker2
from .ranks import Choice, Plan, _as_layers

# The methods with an EVBMF rank rule: their rank slots (as decompose's rank= tuple and meta keys).
METHODS = {"tucker2": _tucker2, "tt_tucker": _tt_tucker, "ht2": _ht2}
SPACES = ("stage", "layer", "global")
COSTS = ("params", "macs")


def _require_bayes_opt():
    try:
        import bayes_opt
    except ImportError as exc:
        raise ImportError("hsvkernels.ranks.bayes_opt needs the bayesian-optimization package: "
                          "pip install 'hsvkernels[bayes]' (or pip install bayesian-optimization)") from exc
    return bayes_opt


@dataclass
class BayesOptResult:
    plan: Plan                    # the best ranks, as for ranks.apply
    history: list                 # one dict per trial, in order (see bayes_opt)
    best: dict                    # the history entry of the best trial
    evbmf_ranks: dict = field(default_factory=dict)   # layer name -> the EVBMF ranks (beta = 1)

    def overrides(self):
        """{layer name: decompose arguments} for convert_(model, method, overrides=...)."""
        return {name: dict(c.config, method=c.method) for name, c in self.plan.items()}


def clamp_ranks(method, shape, ranks):
    """Ranks rounded into [1, max] per slot, with the TT/HT middle rank capped by what its neighbours feed."""
    module = METHODS[method]
    out = [min(max(1, int(r)), m) for r, m in zip(ranks, module.max_ranks(shape))]
    kh, kw = shape[2], shape[3]
    if method == "tt_tucker":      # (R_T, R_S, a): a <= min(R_S*kh, kw*R_T)
        out[2] = min(out[2], out[1] * kh, kw * out[0])
    elif method == "ht2":          # (R1, R13, R3): R13 <= min(R1*kh, R3*kw)
        out[1] = min(out[1], out[0] * kh, out[2] * kw)
    return tuple(out)


def _check_args(method, n_trials, n_initial, bounds, lam, cost, per, seed, objective):
    if method not in METHODS:
        raise ValueError("bayes_opt: method must be one with an EVBMF rank rule, one of %s; got %r"
                         % (", ".join(sorted(METHODS)), method))
    for name, value, low in (("n_trials", n_trials, 1), ("n_initial", n_initial, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError("bayes_opt: %s must be an int >= %d, got %r" % (name, low, value))
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError("bayes_opt: bounds must be two multipliers (low, high), got %r" % (bounds,)) from None
    if not 0 < lo < hi or not math.isfinite(hi):
        raise ValueError("bayes_opt: bounds must satisfy 0 < low < high < inf, got %r" % (bounds,))
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or not math.isfinite(lam):
        raise ValueError("bayes_opt: lam must be a finite number >= 0, got %r" % (lam,))
    if cost not in COSTS:
        raise ValueError("bayes_opt: cost must be one of %s, got %r" % (COSTS, cost))
    if per not in SPACES:
        raise ValueError("bayes_opt: per must be one of %s, got %r" % (SPACES, per))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError("bayes_opt: seed must be an int >= 0, got %r" % (seed,))
    if objective is not None and not callable(objective):
        raise TypeError("bayes_opt: objective must be a callable objective(plan) -> float, got %r" % (objective,))
    return lo, hi


class _Evaluator:
    """Decompositions (cached per layer and ranks) and the default error term."""

    def __init__(self, method, layers, model, calibration):
        self.method, self.layers, self.model, self.calibration = method, layers, model, calibration
        self.cache = [{} for _ in layers]
        self.reference = None
        if model is not None and calibration is not None:
            with torch.no_grad():
                self.reference = self._forward().double()

    def factorization(self, i, ranks):
        fact = self.cache[i].get(ranks)
        if fact is None:
            fact = _decompose(self.layers[i].weight, self.method, rank=ranks)
            self.cache[i][ranks] = fact
        return fact

    def plan(self, ranks_per_layer):
        plan = Plan()
        for i, (layer, ranks) in enumerate(zip(self.layers, ranks_per_layer)):
            fact = self.factorization(i, ranks)
            shape = tuple(layer.weight.shape)
            dense_params = math.prod(shape)
            plan[layer.name] = Choice(self.method, {"rank": ranks}, fact.num_params(),
                                      fact.macs(*layer.out_hw, *layer.in_hw), fact.relative_error(layer.weight) ** 2,
                                      dense_params, dense_params * layer.out_hw[0] * layer.out_hw[1])
        return plan

    def _forward(self):
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model(self.calibration)
        finally:
            self.model.train(was_training)

    def error(self, plan):
        if self.reference is None:
            # Weight-space proxy: the share of the selected layers' energy the decompositions lose.
            energies = [layer.weight.double().square().sum().item() for layer in self.layers]
            lost = sum(c.rel_err_sq * e for c, e in zip(plan.values(), energies))
            return lost / max(sum(energies), 1e-300)
        saved = []
        try:
            with torch.no_grad():
                for i, (layer, ranks) in enumerate(zip(self.layers, (c.config["rank"] for c in plan.values()))):
                    w = layer.module.weight
                    saved.append((w, w.detach().clone()))
                    w.copy_(self.factorization(i, ranks).to_dense().to(dtype=w.dtype, device=w.device))
                out = self._forward().double()
        finally:
            with torch.no_grad():
                for w, value in saved:
                    w.copy_(value)
        return ((out - self.reference).square().sum() / self.reference.square().sum().clamp_min(1e-300)).item()


def _cost_ratio(plan, cost):
    if cost == "params":
        return plan.params() / plan.dense_params()
    return plan.macs() / plan.dense_macs()


def bayes_opt(layers, method="tt_tucker", *, calibration=None, example_input=None, objective=None, lam=0.1,
              cost="params", n_trials=30, n_initial=5, bounds=(0.25, 2.0), per="stage", seed=0, progress=True):
    """Searches rank multipliers around the EVBMF ranks with a GP + expected improvement; returns a BayesOptResult.

    layers: an nn.Module (its nn.Conv2d layers with groups == 1) or a list of
        (weight, out_hw) / (weight, out_hw, in_hw) items, named "0", "1", ...
    method: "tt_tucker", "tucker2" or "ht2" (the methods with rank="evbmf").
    calibration: an input batch for the model; the default objective's error is
        the relative squared error of the model's output on it (also measures the
        layer sizes). example_input: sizes only, when calibration is not given.
    objective(plan) -> float, to minimise, replaces the default
        error + lam * cost ratio; plan is a ranks.Plan of the trial's ranks.
    lam: the weight of the cost ratio (compressed / dense, over the selected
        layers) in the default objective; cost: "params" or "macs".
    n_trials: evaluations in all, the EVBMF start point and n_initial random
        points included; each distinct rank configuration is evaluated once.
    bounds: (low, high) multipliers on the EVBMF ranks.
    per: "stage" | "layer" | "global": which multipliers are searched (module doc).
    seed: the optimiser's random state; the same seed gives the same result.

    history: per trial {"trial", "multipliers" (name -> beta), "ranks" (layer ->
    ranks), "objective", "error" and "cost_ratio" (None with a custom objective
    for error), "cached" (True when the ranks had been evaluated before)}.
    """
    lo, hi = _check_args(method, n_trials, n_initial, bounds, lam, cost, per, seed, objective)
    bayes_opt_lib = _require_bayes_opt()
    model = layers if isinstance(layers, nn.Module) else None
    if calibration is not None and model is None:
        raise ValueError("bayes_opt: calibration= needs a model (an nn.Module), not a list of weights")
    if model is not None and calibration is None and objective is None:
        raise ValueError("bayes_opt: the default objective measures the model's output error: give calibration= "
                         "(an input batch), or objective=")
    layers = _as_layers(layers, calibration if calibration is not None else example_input)
    if not layers:
        raise ValueError("bayes_opt: no layers to compress (nn.Conv2d with groups == 1)")
    names = METHODS[method].NAMES
    disable = None if progress else True

    with single_thread():
        evbmf_ranks = [tuple(_decompose(layer.weight, method, rank="evbmf").meta[n] for n in names) for layer in layers]
        evaluator = _Evaluator(method, layers, model, calibration)

        if per == "stage":
            dims = list(names)
        elif per == "layer":
            dims = [layer.name for layer in layers]
        else:
            dims = ["beta"]
        keys = ["x%03d" % i for i in range(len(dims))]   # sortable keys; dims[i] is what keys[i] scales
        log_lo, log_hi = math.log2(lo), math.log2(hi)

        def ranks_at(x):
            out = []
            for li, (layer, base) in enumerate(zip(layers, evbmf_ranks)):
                if per == "stage":
                    betas = [2.0 ** x[s] for s in range(len(names))]
                elif per == "layer":
                    betas = [2.0 ** x[li]] * len(names)
                else:
                    betas = [2.0 ** x[0]] * len(names)
                out.append(clamp_ranks(method, tuple(layer.weight.shape),
                                       [round(b * r) for b, r in zip(betas, base)]))
            return tuple(out)

        optimizer = bayes_opt_lib.BayesianOptimization(
            f=None, pbounds={k: (log_lo, log_hi) for k in keys},
            acquisition_function=bayes_opt_lib.acquisition.ExpectedImprovement(xi=0.01),
            random_state=seed, verbose=0, allow_duplicate_points=True)

        start = [min(max(0.0, log_lo), log_hi)] * len(keys)        # beta = 1, the EVBMF point
        seen, history, best = {}, [], None
        bar = tqdm(range(n_trials), desc="bayes_opt (%s)" % method, unit="trial", disable=disable, leave=False)
        for trial in bar:
            if trial == 0:
                x = start
            elif trial <= n_initial:
                point = optimizer.random_sample(1)[0]
                x = [float(point[k]) for k in keys]
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # GP hyper-parameter fits at their bounds are routine here
                    point = optimizer.suggest()
                x = [float(point[k]) for k in keys]
            ranks_per_layer = ranks_at(x)
            cached = ranks_per_layer in seen
            if cached:
                value, error, ratio, plan = seen[ranks_per_layer]
            else:
                plan = evaluator.plan(ranks_per_layer)
                ratio = _cost_ratio(plan, cost)
                if objective is None:
                    error = evaluator.error(plan)
                    value = error + lam * ratio
                else:
                    error = None
                    value = float(objective(plan))
                    if not math.isfinite(value):
                        raise ValueError("bayes_opt: objective returned %r for ranks %s; it must be finite"
                                         % (value, dict(zip(plan, ranks_per_layer))))
                seen[ranks_per_layer] = (value, error, ratio, plan)
            optimizer.register({k: v for k, v in zip(keys, x)}, -value)   # the library maximises
            entry = {"trial": trial, "multipliers": {d: 2.0 ** v for d, v in zip(dims, x)},
                     "ranks": {layer.name: r for layer, r in zip(layers, ranks_per_layer)},
                     "objective": value, "error": error, "cost_ratio": ratio, "cached": cached}
            history.append(entry)
            if best is None or value < best[0]["objective"]:
                best = (entry, plan)
            if disable is None:
                bar.set_postfix(best="%.4g" % best[0]["objective"])
    return BayesOptResult(best[1], history, best[0], {layer.name: r for layer, r in zip(layers, evbmf_ranks)})
