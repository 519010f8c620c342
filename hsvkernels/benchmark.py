"""End-to-end latency of a compressed model against its dense counterpart, in one process.

Both models run on the same input, timed in interleaved rounds (dense, compressed,
dense, ...) with torch.utils.benchmark so that drift hits both alike; medians of
per-block means are reported with the thread count and the flags that matter.

layer_times() breaks a forward down by conv: each conv's time inside the model
(forward hooks) beside its time alone, called back to back on the input it saw.
The two differ: inside a model a layer's input, weights and output buffer were
last touched a whole forward earlier, so they come from DRAM, not cache. On the
2-core EPYC VM the 56x56 1x1 layers of a compressed ResNet-50 (batch 1, epilogues
not fused) took 1.5-2.2x their back-to-back time in the model, which a per-layer
benchmark alone does not show.
"""
import copy
import statistics
import time

import torch
from torch import nn
from torch.utils import benchmark

from . import _host_malloc
from ._args import check_count, check_seconds


GRAD_MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}


def time_pair(dense, compressed, x, *, min_run_time=1.0, rounds=3, num_threads=None, grad_mode="inference_mode"):
    """Median seconds per forward of both models and their ratio compressed / dense, under grad_mode
    ("inference_mode" or "no_grad": deployments use either, and per-call overheads differ between them)."""
    if grad_mode not in GRAD_MODES:
        raise ValueError("grad_mode must be one of %s, got %r" % (sorted(GRAD_MODES), grad_mode))
    check_seconds("min_run_time", min_run_time)
    check_count("rounds", rounds)
    threads = torch.get_num_threads() if num_threads is None else num_threads
    fns = {"dense": dense, "compressed": compressed}
    blocks = {name: [] for name in fns}
    with GRAD_MODES[grad_mode]():
        for model in fns.values():
            for _ in range(2):  # warm-up: lazy init, allocator, oneDNN primitive caches
                model(x)
        timers = {name: benchmark.Timer("m(x)", globals={"m": m, "x": x}, num_threads=threads)
                  for name, m in fns.items()}
        for _ in range(rounds):
            for name, timer in timers.items():
                blocks[name].extend(timer.blocked_autorange(min_run_time=min_run_time / rounds).times)
    med = {name: statistics.median(ts) for name, ts in blocks.items()}
    return {"dense_s": med["dense"], "compressed_s": med["compressed"], "ratio": med["compressed"] / med["dense"],
            "blocks": {name: len(ts) for name, ts in blocks.items()}, "threads": threads}


def _conv_layers(model):
    """(name, module) of the model's convs, outermost only: nn.Conv2d and FactorizedConv2d (whose own
    submodules are not convs, but a wrapper's might be)."""
    from .nn import FactorizedConv2d

    found = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, FactorizedConv2d)) and \
                not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    return found


class _Clock:
    """Seconds between two marks: host clock on CPU; CUDA events on the current stream on a GPU, read after
    a synchronize (a synchronize in every hook would serialize the launches the forward overlaps)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end):
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def layer_times(models, x, *, runs=20, warmup=3, alone=True, grad_mode="inference_mode"):
    """Where each model's forward goes, conv by conv.

    models: {label: model} (e.g. dense and compressed), each called on `x`; the forwards are
    interleaved (one of each per round), so drift hits all alike. Returns {label: {"forward_s": median
    forward without hooks, "layers": {conv name: {"in_model_s", "alone_s", "input"}}}}: in_model_s is
    the median time between the conv module's forward pre-hook and hook (its whole call, Python
    included; summed over its calls when a forward calls it more than once) over `runs` hooked
    forwards (interleaved with the plain ones); alone_s the median of `runs` calls of the same module
    on a copy of the arguments it got, each right after an untimed call of it, in rounds over all
    layers (alone=False skips them, and keeps no copies).
    Convs are nn.Conv2d and FactorizedConv2d modules, outermost only; a model traced by
    fuse_epilogues keeps them as modules, so it is covered; a torch.compile'd one is not (its convs
    are no longer module calls) and raises ValueError.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError("grad_mode must be one of %s, got %r" % (sorted(GRAD_MODES), grad_mode))
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict {label: model}, got %r" % type(models).__name__)
    check_count("runs", runs)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError("warmup must be an int >= 0, got %r" % (warmup,))
    if not isinstance(x, torch.Tensor):
        raise TypeError("layer_times: x must be the models' input tensor, got %s" % type(x).__name__)
    clock = _Clock(x.device)
    convs = {}
    for label, model in models.items():
        if not isinstance(model, nn.Module):
            raise TypeError("layer_times: model %r must be an nn.Module, got %s" % (label, type(model).__name__))
        if hasattr(model, "_orig_mod"):
            raise ValueError("layer_times: model %r is torch.compile'd; its convs no longer run as module calls, "
                             "so pass the module before compiling" % label)
        convs[label] = _conv_layers(model)
        if not convs[label]:
            raise ValueError("layer_times: model %r has no nn.Conv2d or FactorizedConv2d" % label)
    marks = {label: {} for label in models}     # conv name -> [start, end, start, end, ...] of the current forward
    in_model = {label: {name: [] for name, _ in convs[label]} for label in models}
    saved = {label: {} for label in models}      # conv name -> (args, input shape) of the first hooked call
    forward = {label: [] for label in models}

    def hooks_for(label, name):
        def pre(module, args):
            if name not in saved[label]:
                saved[label][name] = (tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
                                      if alone else None, tuple(args[0].shape))
            marks[label].setdefault(name, []).append(clock.mark())

        def post(module, args, output):
            marks[label][name].append(clock.mark())
        return pre, post

    handles = []
    alone_times = {label: {name: [] for name, _ in convs[label]} for label in models}

    def timed(fn, *args):
        start = clock.mark()
        fn(*args)
        end = clock.mark()
        clock.sync()
        return clock.seconds(start, end)

    try:
        with GRAD_MODES[grad_mode]():
            for label, model in models.items():
                for _ in range(warmup):
                    model(x)
            clock.sync()
            # Each round: one hooked forward of each model, then one plain forward of each (hooks removed),
            # so that load drift on a shared machine hits both measurements alike.
            for _ in range(runs):
                for label, model in models.items():
                    for name, module in convs[label]:
                        pre, post = hooks_for(label, name)
                        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
                for label, model in models.items():
                    marks[label].clear()
                    model(x)
                    clock.sync()
                    for name, m in marks[label].items():   # a module called twice counts both calls
                        in_model[label][name].append(sum(clock.seconds(m[i], m[i + 1])
                                                         for i in range(0, len(m), 2)))
                for h in handles:
                    h.remove()
                handles = []
                for label, model in models.items():
                    forward[label].append(timed(model, x))
            if alone:
                for label in models:      # warm-up, as for the models
                    for name, module in convs[label]:
                        for _ in range(warmup if name in saved[label] else 0):
                            module(*saved[label][name][0])
                # Rounds over the layers, each timed call right after an untimed one of the same layer
                # (back to back: its input, weights and output buffer warm from that call).
                for _ in range(runs):
                    for label in models:
                        for name, module in convs[label]:
                            if name in saved[label]:
                                args = saved[label][name][0]
                                module(*args)
                                alone_times[label][name].append(timed(module, *args))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for label in models:
        layers = {}
        for name, _ in convs[label]:
            if not in_model[label][name]:
                continue    # a conv the forward did not call
            layers[name] = {"in_model_s": statistics.median(in_model[label][name]),
                            "alone_s": statistics.median(alone_times[label][name]) if alone_times[label][name]
                            else None, "input": list(saved[label][name][1])}
        out[label] = {"forward_s": statistics.median(forward[label]), "layers": layers}
    return out


def dense_twin(compressed):
    """A dense model computing the same function as `compressed` (convs rebuilt from the factors)."""
    from .convert import revert_

    dense = copy.deepcopy(compressed)
    revert_(dense)
    return dense


def flags():
    """The settings that decide which conv kernels run, for the record."""
    out = {"threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
           "torch": torch.__version__, "host_malloc": _host_malloc.describe()}
    if torch.cuda.is_available():
        out.update(device=torch.cuda.get_device_name(), cudnn_benchmark=torch.backends.cudnn.benchmark,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return out
