"""Self-adaptive rank selection over a whole model (methods.md §2.4).

    plan = ranks.select(model, "svd", ratio=4, example_input=x)
    plan = ranks.select(model, "kcp", macs_ratio=3, example_input=x, calibration=batch)
    ranks.apply(model, plan)

Every decomposition method module may offer `candidates(weight, out_hw)`: its
configurations for one layer with exact costs and (estimated) relative squared
errors. We pick one candidate per layer (or keep it dense) to minimise

    sum_l  w_l * rel_err_sq_l    subject to   sum params <= dense / ratio,
                                              sum MACs   <= dense MACs / macs_ratio

over the selected layers, by a Lagrangian relaxation: for a multiplier lambda
every layer independently takes argmin w_l err + lambda cost; lambda is found by
bisection as the smallest that meets the budget, and the slack the discrete
choice leaves is then spent greedily on the upgrades with the best error drop
per unit cost. With both targets, the cost mixes the two (normalised by their
budgets) at a few weights and the best feasible plan wins.

w_l defaults to 1. With a calibration batch, w_l is measured ("self-adaptive"):
each layer alone is replaced by its chosen approximation and the relative
squared error of the model output, per unit of weight error, is its
sensitivity; the allocation is then run again with those weights.
"""
import copy
import inspect
import math
import sys
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import _outputs
from ._threads import single_thread
from .decompose import METHODS
from .decompose import decompose as _decompose
from ._args import check_target as _check_target

DENSE = "dense"


@dataclass(frozen=True)
class Choice:
    """What the plan does with one layer."""
    method: str                   # a decompose method, or "dense" (left as it is)
    config: dict = field(hash=False)  # keyword arguments for decompose(weight, method, **config)
    params: int
    macs: int                     # per image, at the layer's measured output size
    rel_err_sq: float             # ||W - W_hat||^2 / ||W||^2 (the method's estimate)
    dense_params: int
    dense_macs: int
    sensitivity: float = 1.0      # w_l used for the choice
    latency_ms: float = None      # measured, with latency_ratio: this choice's and the dense conv's time per call
    dense_latency_ms: float = None
    # With latency_ratio the chosen factorization was already decomposed to be timed: (layer, weak reference to
    # the conv's weight, fingerprint of it). built_layer() hands it out while that weight is unchanged.
    built: tuple = field(default=None, hash=False, compare=False, repr=False)

    def __getstate__(self):   # pickled and deep-copied plans drop the built layer (and its weak reference)
        return dict(self.__dict__, built=None)


class Plan(dict):
    """layer name -> Choice, with the totals over the selected layers."""

    def params(self):
        return sum(c.params for c in self.values())

    def macs(self):
        return sum(c.macs for c in self.values())

    def dense_params(self):
        return sum(c.dense_params for c in self.values())

    def dense_macs(self):
        return sum(c.dense_macs for c in self.values())

    def compression(self):
        return self.dense_params() / self.params()

    def mac_reduction(self):
        return self.dense_macs() / self.macs()

    def latency_reduction(self):
        """Dense over chosen latency, summed over the layers (None unless selected with latency_ratio)."""
        if any(c.latency_ms is None for c in self.values()):
            return None
        return sum(c.dense_latency_ms for c in self.values()) / sum(c.latency_ms for c in self.values())

    def objective(self):
        return sum(c.sensitivity * c.rel_err_sq for c in self.values())


@dataclass
class _Layer:
    name: str
    weight: torch.Tensor
    out_hw: tuple
    in_hw: tuple
    module: nn.Module = None
    channels_last: bool = False   # the layer's input was channels_last in the probe


def conv_layers(model, example_input):
    """The model's nn.Conv2d layers with groups == 1, with input/output sizes from one forward pass."""
    if example_input is None:
        raise ValueError("select(model, ...) needs example_input= (or calibration=) to measure the layers' "
                         "output sizes")
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    sizes, hooks = {}, []
    for name, m in convs:
        def hook(mod, inputs, output, name=name):
            x = inputs[0]
            sizes.setdefault(name, (tuple(x.shape[2:]), tuple(output.shape[2:]),
                                    x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()))
        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return [_Layer(name, m.weight.detach(), sizes[name][1], sizes[name][0], m, sizes[name][2])
            for name, m in convs if name in sizes]


def _as_layers(layers, example_input):
    if isinstance(layers, nn.Module):
        return conv_layers(layers, example_input)
    out = []
    for i, item in enumerate(layers):
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError("layers must be an nn.Module or a list of (weight, out_hw) or (weight, out_hw, in_hw); "
                             "item %d is %r" % (i, type(item).__name__))
        weight, out_hw = item[0], tuple(item[1])
        in_hw = tuple(item[2]) if len(item) == 3 else out_hw
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            raise ValueError("layer %d: weight must be a 4-D tensor (Cout, Cin, kh, kw)" % i)
        out.append(_Layer(str(i), weight.detach(), out_hw, in_hw))
    return out


def candidates_function(method):
    """The `candidates` function of the module that implements `method`."""
    if method not in METHODS:
        raise ValueError("unknown method %r; expected one of: %s" % (method, ", ".join(sorted(METHODS))))
    fn = getattr(sys.modules[METHODS[method].__module__], "candidates", None)
    if fn is None:
        raise ValueError("method %r offers no candidates() for rank selection" % method)
    return fn



class _Table:
    """One layer's options as arrays sorted by cost (the first of equals wins ties)."""

    def __init__(self, layer, method, cands, allow_dense, macs_capped):
        dense_params = math.prod(layer.weight.shape)
        dense_macs = dense_params * layer.out_hw[0] * layer.out_hw[1]
        opts = [(method, c.config, c.params, c.macs, c.rel_err_sq) for c in cands
                if not (macs_capped and c.macs > dense_macs)]
        if allow_dense or not opts:
            opts.append((DENSE, {}, dense_params, dense_macs, 0.0))
        opts.sort(key=lambda o: (o[2] + o[3], o[4]))
        self.opts = opts
        self.params = np.array([o[2] for o in opts], dtype=np.float64)
        self.macs = np.array([o[3] for o in opts], dtype=np.float64)
        self.err = np.array([o[4] for o in opts], dtype=np.float64)
        self.dense_params, self.dense_macs = dense_params, dense_macs
        # the second cost the solver budgets: MACs, or measured milliseconds (_timed_table)
        self.cost, self.dense_cost = self.macs, float(dense_macs)
        self.latency_ms = self.dense_latency_ms = None
        self.built = None   # per option, the FactorizedConv2d _timed_table decomposed (None: not built)


def _allocate(tables, weights, budgets, scales, mix):
    """Indices of one option per layer: Lagrangian bisection, then a greedy fill of the slack.

    budgets: (params, MACs) totals not to exceed (inf when not constrained);
    scales: finite normalisers of the two costs; mix: their weights in the cost.
    Returns None when even the cheapest options exceed a budget.
    """
    costs = [mix[0] * t.params / scales[0] + mix[1] * t.cost / scales[1] for t in tables]
    errs = [w * t.err for w, t in zip(weights, tables)]

    def pick(lam):
        return [int(np.argmin(e + lam * c)) for e, c in zip(errs, costs)]

    def feasible(idx):
        p = sum(t.params[i] for t, i in zip(tables, idx))
        m = sum(t.cost[i] for t, i in zip(tables, idx))
        return p <= budgets[0] * (1 + 1e-12) and m <= budgets[1] * (1 + 1e-12)

    cheapest = []
    on = [float(math.isfinite(b)) for b in budgets]   # only the budgeted costs count (latency need not follow params)
    for t in tables:  # per layer the option that is cheapest in both costs, if one is
        order = np.lexsort((t.err, on[1] * t.cost / scales[1] + on[0] * t.params / scales[0]))
        cheapest.append(int(order[0]))
    if not feasible(cheapest):
        return None
    hi = 1.0
    while not feasible(pick(hi)) and hi < 1e30:
        hi *= 4.0
    if feasible(pick(hi)):
        lo = 0.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if feasible(pick(mid)) else (mid, hi)
        idx = pick(hi)
    else:  # this mix cannot reach the budget by itself; start from the cheapest options
        idx = cheapest
    return _fill(tables, errs, idx, budgets, scales)


def _fill(tables, errs, idx, budgets, scales):
    """Greedy upgrades within the budget left, best error drop per unit of (normalised) cost first."""
    idx = list(idx)
    p = sum(t.params[i] for t, i in zip(tables, idx))
    m = sum(t.cost[i] for t, i in zip(tables, idx))
    cap_p, cap_m = budgets[0] * (1 + 1e-12), budgets[1] * (1 + 1e-12)
    while True:
        best = None
        for l, (t, e) in enumerate(zip(tables, errs)):
            i = idx[l]
            dp, dm, de = t.params - t.params[i], t.cost - t.cost[i], e[i] - e
            ok = (p + dp <= cap_p) & (m + dm <= cap_m) & (de > 0)
            if not ok.any():
                continue
            cost = np.maximum(np.maximum(dp / scales[0], dm / scales[1]), 1e-300)
            gain = np.where(ok, de / cost, -np.inf)
            j = int(np.argmax(gain))
            if best is None or gain[j] > best[0]:
                best = (gain[j], l, j)
        if best is None:
            return idx
        _, l, j = best
        p += tables[l].params[j] - tables[l].params[idx[l]]
        m += tables[l].cost[j] - tables[l].cost[idx[l]]
        idx[l] = j


def _solve(tables, weights, ratio, cost_ratio):
    """cost_ratio: the target on the tables' second cost (MACs, or milliseconds for _timed_table's tables)."""
    dense_p = sum(t.dense_params for t in tables)
    dense_m = sum(t.dense_cost for t in tables)
    budgets = (dense_p / ratio if ratio is not None else math.inf,
               dense_m / cost_ratio if cost_ratio is not None else math.inf)
    scales = (dense_p / (ratio or 1), dense_m / (cost_ratio or 1))
    if ratio is not None and cost_ratio is not None:
        mixes = [(1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0)]
    else:
        mixes = [(1.0, 0.0)] if ratio is not None else [(0.0, 1.0)]
    best = None
    for mix in mixes:
        idx = _allocate(tables, weights, budgets, scales, mix)
        if idx is None:
            continue
        obj = sum(w * t.err[i] for w, t, i in zip(weights, tables, idx))
        if best is None or obj < best[0] - 1e-15:
            best = (obj, idx)
    if best is None:
        cheap_p = sum(t.params.min() for t in tables)
        cheap_m = sum(t.cost.min() for t in tables)
        timed = tables[0].latency_ms is not None
        second = ("measured latency reduction", "latency_ratio") if timed else ("MAC reduction", "macs_ratio")
        raise ValueError("budget out of reach: the cheapest candidates give at most %.3gx parameter compression and "
                         "%.3gx %s (asked ratio=%s, %s=%s)"
                         % (dense_p / cheap_p, dense_m / cheap_m, second[0], ratio, second[1], cost_ratio))
    return best[1]


def _plan(layers, tables, idx, weights):
    plan = Plan()
    for layer, t, i, w in zip(layers, tables, idx, weights):
        method, config, params, macs, err = t.opts[i]
        lat = None if t.latency_ms is None else float(t.latency_ms[i])
        built = None
        if t.built is not None and t.built[i] is not None:
            conv = layer.module
            built = (t.built[i], weakref.ref(conv.weight), _fingerprint(conv))
        plan[layer.name] = Choice(method, dict(config), int(params), int(macs), float(err), t.dense_params,
                                  t.dense_macs, float(w), lat, t.dense_latency_ms, built)
    return plan


def _fingerprint(conv):
    """Cheap, exact-enough identity of a conv's values: sums of its weight and bias, and of their squares."""
    with torch.no_grad():
        return tuple(float(f(t.detach().double())) for t in (conv.weight, conv.bias) if t is not None
                     for f in (torch.sum, lambda v: torch.sum(v * v)))


def built_layer(choice, conv):
    """The FactorizedConv2d a latency plan decomposed (to time it) for `conv`, or None.

    None unless the plan was made from this very conv and its weight and bias still hold the
    values they had then; convert_ and apply use it instead of decomposing the weight again.
    """
    if choice.built is None:
        return None
    layer, weight_ref, fingerprint = choice.built
    if weight_ref() is not conv.weight or _fingerprint(conv) != fingerprint:
        return None
    # the timing gave its factors the input's layout; a fresh decomposition gives contiguous ones
    return layer._apply(lambda t: t.contiguous())


def _probe(table, chosen, ratio, cost_ratio):
    """The option whose effect on the output measures the layer's sensitivity.

    The chosen one, unless it is dense or exact; then the non-dense option nearest
    the uniform target, so every layer is probed at a comparable compression.
    """
    if table.opts[chosen][0] != DENSE and table.err[chosen] > 0:
        return chosen
    target = table.dense_params / ratio if ratio is not None else table.dense_params
    mtarget = table.dense_cost / cost_ratio if cost_ratio is not None else table.dense_cost
    floor = 1e-12 * table.dense_cost   # the cost may be milliseconds, well below 1
    score = (np.abs(np.log(np.maximum(table.params, 1) / target))
             + np.abs(np.log(np.maximum(table.cost, floor) / mtarget)))
    order = [int(i) for i in np.argsort(score, kind="stable")
             if table.opts[int(i)][0] != DENSE and table.err[int(i)] > 0]
    return order[0] if order else None


def _sensitivities(model, layers, tables, idx, method, calibration, ratio, cost_ratio, disable):
    """Output error per unit weight error of each layer decomposed alone (mean 1 over the layers)."""
    was_training = model.training
    model.eval()
    weights = []
    try:
        with torch.no_grad():
            ref = model(calibration).double()
            ref_norm = ref.square().sum().clamp_min(1e-300)
            for layer, t, i in tqdm(list(zip(layers, tables, idx)), desc="sensitivities", disable=disable):
                j = _probe(t, i, ratio, cost_ratio)
                if j is None:
                    weights.append(None)
                    continue
                w = layer.module.weight
                fact = _decompose(w.detach(), method, **t.opts[j][1])
                approx = fact.to_dense().to(dtype=w.dtype, device=w.device)
                weight_err = fact.relative_error(w) ** 2
                saved = w.detach().clone()
                w.copy_(approx)
                try:
                    out_err = ((model(calibration).double() - ref).square().sum() / ref_norm).item()
                finally:
                    w.copy_(saved)
                weights.append(out_err / max(weight_err, 1e-300))
    finally:
        model.train(was_training)
    known = [w for w in weights if w is not None]
    mean = sum(known) / len(known) if known and sum(known) > 0 else 1.0
    return [(w / mean if w is not None else 1.0) for w in weights]


def select(layers, method="svd", *, ratio=None, macs_ratio=None, latency_ratio=None, example_input=None,
           calibration=None, sensitivities=None, allow_dense=True, progress=True, latency_points=6, timer=None):
    """Chooses one configuration per layer under a global budget; returns a Plan.

    layers: an nn.Module (its nn.Conv2d layers with groups == 1; sizes measured
        with one forward pass on example_input, or on calibration) or a list of
        (weight, out_hw) / (weight, out_hw, in_hw) items, named "0", "1", ...
    method: a method of hsvkernels.METHODS whose module offers candidates().
    ratio / macs_ratio: global targets over the selected layers (>= 1; at least one).
    calibration: an input batch (model only); measures each layer's sensitivity
        and re-allocates with it. sensitivities: explicit w_l per layer instead.
    allow_dense: a layer may stay dense when that serves the budget best.
    With ratio alone, no layer may cost more MACs than its dense conv (as in
    decompose); with macs_ratio the MAC budget itself governs.
    latency_ratio: a measured budget instead of macs_ratio (model only): the
        summed latency of the selected layers must fall by this factor. Each
        layer's options are cut to `latency_points` along its error-vs-MACs
        front, each is decomposed and timed on the layer's input (random, of the
        example batch's size, on the model's device and dtype) by
        timer(module, x) -> milliseconds (default: hsvkernels._timing.latency_ms,
        CUDA-graph device time on a GPU), and so is the dense conv; the choice is
        among the timed options. A layer whose factorizations all run slower than
        dense stays dense unless the budget needs it. Measure with the model
        where it will run: device, dtype, memory format and batch size change the answer.
    progress: show tqdm bars (auto-hidden when not on a terminal).
    """
    _check_target("ratio", ratio)
    _check_target("macs_ratio", macs_ratio)
    _check_target("latency_ratio", latency_ratio)
    if ratio is None and macs_ratio is None and latency_ratio is None:
        raise ValueError("select: give ratio=, macs_ratio= and/or latency_ratio=")
    fn = candidates_function(method)
    model = layers if isinstance(layers, nn.Module) else None
    if calibration is not None and model is None:
        raise ValueError("calibration= needs a model (an nn.Module), not a list of weights")
    if latency_ratio is not None:
        if macs_ratio is not None:
            raise ValueError("select: give macs_ratio= or latency_ratio=, not both (latency is the measured cost "
                             "that replaces MACs)")
        if model is None:
            raise ValueError("latency_ratio= needs a model (an nn.Module) to time its layers, not a list of weights")
        if isinstance(latency_points, bool) or not isinstance(latency_points, int) or latency_points < 2:
            raise ValueError("latency_points must be an int >= 2, got %r" % (latency_points,))
    for name, batch in (("example_input", example_input), ("calibration", calibration)):
        _outputs.check_finite(name, batch)   # one NaN made every layer's error NaN and the plan rank 1 everywhere
    layers = _as_layers(layers, example_input if example_input is not None else calibration)
    if not layers:
        raise ValueError("select: no layers to compress (nn.Conv2d with groups == 1)")
    if sensitivities is not None:
        sensitivities = [float(w) for w in sensitivities]
        if len(sensitivities) != len(layers) or not all(0 <= w < math.inf for w in sensitivities):
            raise ValueError("sensitivities must be %d finite non-negative numbers, one per layer, got %s"
                             % (len(layers), sensitivities))
    takes_in_hw = "in_hw" in inspect.signature(fn).parameters
    disable = None if progress else True
    tables = []
    with single_thread():
        for layer in tqdm(layers, desc="candidates (%s)" % method, disable=disable):
            kwargs = {"in_hw": layer.in_hw} if takes_in_hw else {}
            tables.append(_Table(layer, method, fn(layer.weight, layer.out_hw, **kwargs), allow_dense,
                                 macs_capped=macs_ratio is None))
    second = macs_ratio
    if latency_ratio is not None:   # timed with the caller's threads: the layers will run with them
        batch = example_input if example_input is not None else calibration
        batch = batch.shape[0] if isinstance(batch, torch.Tensor) and batch.dim() > 0 else 1
        tables = [_timed_table(layer, t, method, batch, latency_points, timer)
                  for layer, t in tqdm(list(zip(layers, tables)), desc="latency (%s)" % method, disable=disable)]
        second = latency_ratio
    with single_thread():
        weights = sensitivities or [1.0] * len(layers)
        idx = _solve(tables, weights, ratio, second)
        if calibration is not None and sensitivities is None:
            weights = _sensitivities(model, layers, tables, idx, method, calibration, ratio, second, disable)
            idx = _solve(tables, weights, ratio, second)
    return _plan(layers, tables, idx, weights)


def _front(table, points):
    """Up to `points` non-dense options spread along the table's error-vs-MACs front (cheapest and best kept)."""
    order = sorted((i for i, o in enumerate(table.opts) if o[0] != DENSE), key=lambda i: (table.macs[i], table.err[i]))
    front, best = [], math.inf
    for i in order:
        if table.err[i] < best:
            front.append(i)
            best = table.err[i]
    if len(front) > points:
        front = [front[k] for k in sorted({round(j * (len(front) - 1) / (points - 1)) for j in range(points)})]
    return front


def _timed_table(layer, table, method, batch, points, timer):
    """The table cut to the options of _front plus dense, with measured milliseconds as their cost."""
    from ._timing import latency_ms
    from .nn import FactorizedConv2d
    timer = timer or latency_ms
    conv, w = layer.module, layer.module.weight
    layout = torch.channels_last if layer.channels_last else torch.contiguous_format
    x = torch.randn(batch, conv.in_channels, *layer.in_hw, device=w.device, dtype=w.dtype)
    x = x.contiguous(memory_format=layout)
    keep = _front(table, points) + [i for i, o in enumerate(table.opts) if o[0] == DENSE]
    with torch.no_grad():
        dense_ms = float(timer(conv, x))
        ms, built = [], []
        for i in keep:
            if table.opts[i][0] == DENSE:
                ms.append(dense_ms)
                built.append(None)
            else:
                module = FactorizedConv2d.from_conv(conv, method, **table.opts[i][1])
                module.to(memory_format=layout)  # the layout the model's own tensors have
                ms.append(float(timer(module, x)))
                built.append(module)
    out = copy.copy(table)
    out.opts = [table.opts[i] for i in keep]
    out.params, out.macs, out.err = table.params[keep], table.macs[keep], table.err[keep]
    out.cost = out.latency_ms = np.array(ms, dtype=np.float64)
    out.built = built   # kept (one module per timed option) until _plan takes the chosen ones
    out.dense_cost = out.dense_latency_ms = dense_ms
    return out


def apply(model, plan):
    """Replaces each planned nn.Conv2d of model by a FactorizedConv2d (dense choices stay); returns model."""
    from .nn import FactorizedConv2d  # late: nn imports decompose, which is fine, but keeps ranks light
    for name, choice in plan.items():
        if choice.method == DENSE:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, child)
        layer = built_layer(choice, conv) or FactorizedConv2d.from_conv(conv, choice.method, **choice.config)
        setattr(parent, child, layer.train(conv.training))
    return model


def bayes_opt(layers, method="tt_tucker", **kwargs):
    """Bayesian-optimisation rank search around the EVBMF ranks; see hsvkernels.bayesopt.bayes_opt.

    Needs the optional bayesian-optimization package (pip install 'hsvkernels[bayes]').
    """
    from .bayesopt import bayes_opt as search  # late: bayesopt imports Plan and Choice from here
    return search(layers, method, **kwargs)
