"""convert_(model, ...): swap a model's nn.Conv2d layers for FactorizedConv2d, in place.

Every conv gets a row in the returned Report, including the ones left dense and
why. revert_(model) turns FactorizedConv2d layers back into nn.Conv2d.
With fold_bn=True, eval-mode BatchNorm2d layers are first folded into the convs
they follow (see fold.py).
"""
import contextlib
import fnmatch
import logging
import math
import warnings

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from . import _outputs
from ._args import check_target
from ._progress import progress as progress_bar
from .decompose import METHODS
from .fold import fold_batch_norms_, replace_module as _replace
from .nn import FactorizedConv2d
from .ranks import DENSE as _PLAN_DENSE, built_layer as _built_layer, select as _select
from .report import DENSE, FACTORIZED, LayerRow, Report

log = logging.getLogger("hsvkernels.convert")

# Below this many weights a layer's share of cost is negligible and the extra
# kernel launch of a factorized chain usually costs more than it saves.
DEFAULT_MIN_PARAMS = 4096


def convert_(model, method="hsv", *, ratio=None, rank=None, filter_fn=None, skip=(), overrides=None,
             example_input=None, calibration=None, measure=False, progress=True, min_params=DEFAULT_MIN_PARAMS,
             decompose_threads=None, fold_bn=False, budget=None, ranks=None, **method_options):
    """Replaces eligible nn.Conv2d layers of `model` with FactorizedConv2d, in place.

    method, ratio/rank, **method_options: passed to hsvkernels.decompose for every layer.
    filter_fn(module, name) -> bool: False keeps that conv dense.
    skip: fnmatch patterns of layer names to keep dense.
    overrides: {pattern: None | dict}; the first pattern matching a layer name wins.
        None keeps the layer dense, a dict updates the decompose arguments
        (it may set "method"; a "rank" replaces the global ratio and vice versa).
    example_input: a batch (or tuple of forward arguments) for one forward pass
        that gives each conv's output size (for MACs). When given, it is also the
        calibration batch: each layer's output error is measured on the input it
        sees. Default: a random 1xCx224x224 batch on the model's device (C = the
        first conv's input channels), used for sizes only.
    calibration: a batch (e.g. real images) for the per-layer and whole-model
        output errors (and for measure's timings) when it should differ from
        example_input; sizes then still come from example_input (or from the
        calibration batch when example_input is not given).
    budget: a model-wide target instead of a per-layer one: a number (parameter
        compression over the convs convert_ factorizes) or a dict with "ratio"
        and/or "macs_ratio". hsvkernels.ranks.select then spends it where it
        costs the least weight error; a layer may stay dense by that choice.
        The method must offer candidates (all but cp do).
    ranks: a hsvkernels.ranks.Plan (from ranks.select, e.g. with a calibration
        batch for sensitivity weights) giving each layer's method and config;
        convs not in the plan stay dense. budget/ranks exclude ratio/rank.
        Override dicts still apply on top of either (and factorize a layer the
        plan keeps dense).
    measure: time each layer dense vs factorized on its example input and keep
        the faster (CPU: wall time; CUDA: device time of CUDA-graph replays,
        see hsvkernels._timing.latency_ms).
    min_params: convs with fewer weights stay dense.
    decompose_threads: torch CPU threads while decomposing (default: unchanged).
        1 is often fastest: threaded LAPACK SVD gains little on conv-sized
        matrices and slows down badly (40x seen) when cores are shared.
    fold_bn: fold every BatchNorm2d that directly and exclusively follows a conv
        that would be factorized (not skipped, filtered out, grouped or small) into
        that conv before decomposing it; the BN becomes a FoldedBatchNorm (an
        nn.Identity). Needs the model in eval mode (running statistics are used).
        Pairs come from a torch.fx trace; a model fx cannot trace is converted
        without folding, with a warning and a note in the report. revert_ does
        not bring the BN back: the dense convs carry the folded weights.

    Grouped convs, layers whose decomposition fails and layers whose factorized
    form needs more MACs (or parameters) than the dense one also stay dense; the
    report says why. Returns a hsvkernels.report.Report.
    """
    if not isinstance(model, nn.Module):
        raise TypeError("convert_ expects an nn.Module, got %s" % type(model).__name__)
    if overrides is not None and not isinstance(overrides, dict):
        raise TypeError("convert_: overrides must be a dict {name pattern: None or decompose arguments}, got %s"
                        % type(overrides).__name__)
    overrides = dict(overrides or {})
    if isinstance(skip, str):
        skip = (skip,)
    if skip is None or not isinstance(skip, (list, tuple, set)) or not all(isinstance(p, str) for p in skip):
        raise TypeError("convert_: skip must be a name pattern or a list of them (fnmatch strings), got %r" % (skip,))
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("convert_: filter_fn must be callable as filter_fn(module, name) -> bool, got %r"
                        % (filter_fn,))
    if decompose_threads is not None and (isinstance(decompose_threads, bool) or not isinstance(decompose_threads, int)
                                          or decompose_threads < 1):
        raise ValueError("convert_: decompose_threads must be None or an int >= 1, got %r" % (decompose_threads,))
    if isinstance(min_params, bool) or not isinstance(min_params, int) or min_params < 0:
        raise ValueError("convert_: min_params must be an int >= 0, got %r" % (min_params,))
    for name, value in (("example_input", example_input), ("calibration", calibration)):
        if value is not None and not _outputs.leaves(value):
            raise TypeError("convert_: %s must be the model's input tensor (or a tuple of its inputs), got %s"
                            % (name, type(value).__name__))
        _outputs.check_finite(name, value)   # a NaN would make every measured error NaN
    _check_method(method, "method")
    for pattern, value in overrides.items():
        if not isinstance(pattern, str):
            raise TypeError("overrides keys must be layer-name patterns (str), got %r" % (pattern,))
        if value is not None and not isinstance(value, dict):
            raise TypeError("overrides[%r] must be None (keep dense) or a dict of decompose arguments, got %r"
                            % (pattern, value))
        if value and "method" in value:
            _check_method(value["method"], "overrides[%r]['method']" % pattern)

    if fold_bn:
        training = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.training]
        if training:
            raise ValueError("convert_: fold_bn=True needs the model in eval mode (call model.eval() first): "
                             "folding uses running statistics, but %d BatchNorm2d layer(s) are in training mode, "
                             "e.g. %r" % (len(training), training[0]))

    if budget is not None or ranks is not None:
        if budget is not None and ranks is not None:
            raise ValueError("convert_: give budget= or ranks=, not both")
        if ratio is not None or rank is not None:
            raise ValueError("convert_: budget=/ranks= choose every layer's size; do not also give ratio= or rank=")
        budget = _check_budget(budget)
        if ranks is not None and not isinstance(ranks, dict):
            raise TypeError("convert_: ranks must be a hsvkernels.ranks.Plan (from ranks.select), got %s"
                            % type(ranks).__name__)

    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if ranks and not set(ranks) & {name for name, _ in convs}:
        raise ValueError("convert_: the ranks plan names none of this model's convs (plan layers %s...); make it with "
                         "ranks.select(model, ...) on this model" % ", ".join(list(ranks)[:3]))
    calibrate = example_input is not None or calibration is not None
    calib_batch, calib_name = (calibration, "calibration") if calibration is not None else (example_input,
                                                                                            "example_input")
    model_params_before = _count_params(model)
    if calibration is not None and example_input is not None:
        shapes, _, _ = _probe(model, convs, example_input, keep_inputs=False)
        _, inputs, y_dense = _probe(model, convs, calibration, keep_inputs=True, what="calibration")
    else:
        shapes, inputs, y_dense = _probe(model, convs, calib_batch, keep_inputs=calibrate or measure, what=calib_name)
        if example_input is None:
            example_input = calibration  # sizes (and the report's input size) come from it
    first = example_input[0] if isinstance(example_input, (tuple, list)) else example_input
    input_size = tuple(first.shape) if first is not None else _default_input_shape(convs)

    base = dict(method_options, method=method)
    if ratio is not None:
        base["ratio"] = ratio
    if rank is not None:
        base["rank"] = rank

    options = _public_options(base)
    if budget is not None:
        options["budget"] = budget
    report = Report(method=method, options=options, input_size=input_size, model_params_before=model_params_before)

    def will_try(name, conv):
        scratch = LayerRow(name=name, shape=())
        return (_layer_kwargs(name, base, skip, overrides, scratch) is not None
                and (filter_fn is None or filter_fn(conv, name)) and _ineligible(conv, min_params) is None)
    folded = {}
    if fold_bn:
        folded = _fold_batch_norms(model, {conv for name, conv in convs if will_try(name, conv)}, report)
    plan = ranks
    if budget is not None:  # after folding: the allocation must see the weights that get factorized
        with _threads(decompose_threads):
            plan = _allocate(method, [(n, c) for n, c in convs if will_try(n, c) and c in shapes], shapes, budget,
                             progress)
    failures = []
    for name, conv in progress_bar(convs, progress, "hsvkernels.convert_", "layer"):
        row = _row_for(name, conv, shapes.get(conv))
        row.folded_bn = folded.get(conv)
        report.layers.append(row)
        kwargs = _layer_kwargs(name, base, skip, overrides, row)
        if kwargs is None:
            continue
        if filter_fn is not None and not filter_fn(conv, name):
            row.reason = "excluded by filter_fn"
            continue
        if reason := _ineligible(conv, min_params):
            row.reason = reason
            continue
        if plan is not None:
            choice = plan.get(name)
            if choice is not None and choice.method != _PLAN_DENSE:
                kwargs = _layer_kwargs(name, dict(method_options, method=choice.method, **choice.config), (),
                                       overrides, row)
            elif not any(fnmatch.fnmatchcase(name, p) for p in overrides):  # an override dict beats the plan
                if choice is None:
                    row.reason = ("not in the ranks plan" if budget is None
                                  else "not run by the example input, so outside the budget")
                else:
                    row.reason = "kept dense by the %s" % ("budget allocation" if budget is not None else "ranks plan")
                continue
        layer_method = kwargs.pop("method")
        row.method = layer_method
        # A latency plan decomposed the chosen option already, to time it. Extra method options or an
        # override would make a different factorization, so only the plan's own config is reused.
        reuse = _built_layer(choice, conv) if plan is not None and choice is not None and \
            choice.method == layer_method and kwargs == choice.config else None
        try:
            with _threads(decompose_threads):
                layer = reuse or FactorizedConv2d.from_conv(conv, method=layer_method, **kwargs)
        except Exception as exc:  # one bad layer must not stop the conversion of the others
            row.reason = "decomposition failed: %s: %s" % (type(exc).__name__, exc)
            failures.append(row.reason)
            log.warning("%s: %s", name, row.reason)
            continue
        if not _fill_factorized(row, layer, conv, shapes.get(conv)):
            continue
        x = inputs.get(conv)
        try:
            if x is not None and calibrate:
                row.output_error = _output_error(conv, layer, x)
            if x is not None and measure:
                from ._timing import latency_ms
                row.latency_dense_ms = latency_ms(conv, x)
                row.latency_factorized_ms = latency_ms(layer, x)
        except Exception as exc:  # e.g. a kind the native extension was built without
            row.reason = "factorized layer failed to run: %s: %s" % (type(exc).__name__, exc)
            _keep_dense(row)
            log.warning("%s: %s", name, row.reason)
            continue
        if row.latency_factorized_ms is not None:
            if row.latency_factorized_ms > row.latency_dense_ms:
                row.reason = "slower than dense: %.3f ms vs %.3f ms" % (row.latency_factorized_ms,
                                                                        row.latency_dense_ms)
                _keep_dense(row)
                continue
        layer.train(conv.training)
        _replace(model, conv, layer)
        row.decision = FACTORIZED
        if row.macs_before is None:
            row.reason = "not run by the example input; MACs unknown"
        log.info("%s: %s %s rel. error %.4g, params %d -> %d", name, layer_method, row.meta, row.rel_error,
                 row.params_before, row.params_after)

    attempted = [r for r in report.layers if r.method is not None]
    if attempted and len(failures) == len(attempted):
        # Every decomposition failed: almost surely a bad argument, not a property of the layers.
        raise ValueError("convert_: no layer could be decomposed; first error: %s" % failures[0])
    report.model_params_after = _count_params(model)
    if calibrate and _outputs.leaves(y_dense) and report.factorized:
        # Per-layer errors compound; this is what the whole model's output lost (None if it cannot be compared).
        _, _, y = _probe(model, [], calib_batch, keep_inputs=False, what=calib_name)
        report.model_output_error = _outputs.relative_error(y, y_dense)
    return report


def revert_(model):
    """Replaces every FactorizedConv2d in `model` with the nn.Conv2d its factors represent, in place.

    Returns the names of the reverted layers. BatchNorm layers folded by
    convert_(fold_bn=True) stay folded: the dense convs hold the folded weights
    and bias, and the FoldedBatchNorm identities stay in place.
    """
    if not isinstance(model, nn.Module):
        raise TypeError("revert_ expects an nn.Module, got %s" % type(model).__name__)
    names = []
    for name, m in list(model.named_modules()):
        if isinstance(m, FactorizedConv2d):
            dense = m.to_dense()
            dense.train(m.training)
            _replace(model, m, dense)
            names.append(name)
    return names


# Steps of convert_ ------------------------------------------------------------------------

def _check_method(method, what):
    if method not in METHODS:
        raise ValueError("convert_: %s %r is not a known method; expected one of: %s"
                         % (what, method, ", ".join(sorted(METHODS))))


def _public_options(base):
    return {k: v for k, v in base.items() if k != "method"}


def _layer_kwargs(name, base, skip, overrides, row):
    """The decompose arguments for one layer, or None (with row.reason set) if it is skipped."""
    for pattern in skip:
        if fnmatch.fnmatchcase(name, pattern):
            row.reason = "skipped (skip pattern %r)" % pattern
            return None
    kwargs = dict(base)
    for pattern, value in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            if value is None:
                row.reason = "skipped (override %r is None)" % pattern
                return None
            if "rank" in value:
                kwargs.pop("ratio", None)
            if "ratio" in value:
                kwargs.pop("rank", None)
            kwargs.update(value)
            break
    return kwargs


def _check_budget(budget):
    """budget as {"ratio": r[, "macs_ratio": m]} (None stays None)."""
    if budget is None:
        return None
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        budget = {"ratio": budget}
    if not isinstance(budget, dict) or not budget or set(budget) - {"ratio", "macs_ratio"}:
        raise ValueError("convert_: budget must be a number (parameter compression) or a dict with 'ratio' and/or "
                         "'macs_ratio', got %r (for a measured latency budget: plan = ranks.select(model, method, "
                         "latency_ratio=..., example_input=x), then convert_(model, ranks=plan))" % (budget,))
    for key, value in budget.items():
        check_target("budget[%r]" % key, value, "a parameter compression" if key == "ratio" else "a MAC reduction")
    return dict(budget)


def _allocate(method, convs, shapes, budget, progress):
    """hsvkernels.ranks.select over the given convs; returns {name: Choice}."""
    if not convs:
        raise ValueError("convert_: budget= but no conv is eligible for factorizing")
    items = [(conv.weight, shapes[conv][1], shapes[conv][0]) for _, conv in convs]
    chosen = _select(items, method, progress=progress, **budget)
    return {name: chosen[str(i)] for i, (name, _) in enumerate(convs)}


def _fold_batch_norms(model, eligible, report):
    """Folds each BN that exclusively follows an eligible conv; returns {conv: bn name}."""
    try:
        pairs = fold_batch_norms_(model, convs=eligible)
    except RuntimeError as exc:
        note = "fold_bn: %s; no BatchNorm was folded" % exc
        warnings.warn(note, stacklevel=3)
        report.notes.append(note)
        return {}
    log.info("fold_bn: folded %d conv -> BatchNorm2d pairs", len(pairs))
    return {model.get_submodule(conv_name): bn_name for conv_name, bn_name in pairs}


def _ineligible(conv, min_params):
    """Why a conv cannot or should not be factorized, or None."""
    if is_lazy(conv.weight):
        return "lazy conv, not initialised yet"
    if conv.groups != 1:
        return "grouped conv (groups=%d): factors would span all input channels" % conv.groups
    if conv.weight.numel() < min_params:
        return "small layer: %d weights < min_params=%d" % (conv.weight.numel(), min_params)
    return None


def _row_for(name, conv, sizes):
    row = LayerRow(name=name, shape=tuple(conv.weight.shape), groups=conv.groups)
    row.params_before = row.params_after = sum(p.numel() for p in conv.parameters(recurse=False))
    if sizes is not None:
        _, (ho, wo) = sizes
        row.macs_before = row.macs_after = math.prod(row.shape) * ho * wo
    return row


def _fill_factorized(row, layer, conv, sizes):
    """Fills the row's costs and error; False (row left dense, reason set) if factorizing doesn't pay."""
    fact = layer.factorization
    row.meta = dict(fact.meta)
    row.params_after = layer.num_params()
    row.rel_error = fact.relative_error(conv.weight)
    if sizes is not None:
        (hi, wi), (ho, wo) = sizes
        row.macs_after = fact.macs(ho, wo, hi, wi)
    if row.params_after >= row.params_before:
        row.reason = "no saving: %d params factorized vs %d dense" % (row.params_after, row.params_before)
    elif row.macs_after is not None and row.macs_after > row.macs_before:
        row.reason = "no saving: %d MACs factorized vs %d dense" % (row.macs_after, row.macs_before)
    else:
        return True
    _keep_dense(row)
    return False


def _keep_dense(row):
    """Marks a tried layer as kept dense; its after-costs revert to the dense ones."""
    row.decision = DENSE
    row.params_after = row.params_before
    row.macs_after = row.macs_before


def _output_error(conv, layer, x):
    with torch.no_grad():
        return _outputs.relative_error(layer(x), conv(x))


# Model plumbing ---------------------------------------------------------------------------

def _default_input_shape(convs):
    channels = convs[0][1].in_channels if convs else 3
    return (1, channels, 224, 224)


def _model_device_dtype(model):
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _probe(model, convs, example_input, keep_inputs, what="example_input"):
    """One forward pass in eval mode over (name, conv) pairs.

    Returns {conv: ((Hin, Win), (Hout, Wout))}, {conv: its input} (if asked) and the model's output.
    """
    default = example_input is None
    if default:
        device, dtype = _model_device_dtype(model)
        example_input = torch.randn(_default_input_shape(convs), device=device, dtype=dtype)
    shapes, inputs = {}, {}

    def hook(module, args, output):
        if module in shapes or not args or not isinstance(output, torch.Tensor):
            return
        shapes[module] = (tuple(args[0].shape[-2:]), tuple(output.shape[-2:]))
        if keep_inputs:
            inputs[module] = args[0].detach()

    handles = [c.register_forward_hook(hook) for c in {m for _, m in convs}]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # batch norm must not update its running statistics here
        with torch.no_grad():
            if isinstance(example_input, (tuple, list)):
                output = model(*example_input)
            else:
                output = model(example_input)
    except Exception as exc:
        # Almost always an input that does not fit the model (channels, size): a usage error.
        if default:
            raise ValueError("convert_: the forward pass that sizes the convs failed on a default random input of "
                             "shape %s (%s: %s); pass example_input=" % (tuple(example_input.shape),
                                                                         type(exc).__name__, exc)) from exc
        shape = [tuple(t.shape) for t in example_input if isinstance(t, torch.Tensor)] \
            if isinstance(example_input, (tuple, list)) else tuple(example_input.shape)
        raise ValueError("convert_: the model's forward pass on %s of shape %s failed (%s: %s)"
                         % (what, shape, type(exc).__name__, exc)) from exc
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return shapes, inputs, output


@contextlib.contextmanager
def _threads(n):
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _count_params(model):
    return sum(p.numel() for p in model.parameters())
