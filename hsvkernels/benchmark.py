"""End-to-end latency of a compressed model against its dense counterpart, in one process.

Both models run on the same input, timed in interleaved rounds (dense, compressed,
dense, ...) with torch.utils.benchmark so that drift hits both alike; medians of
per-block means are reported with the thread count and the flags that matter.
"""
import copy
import statistics

import torch
from torch.utils import benchmark

from . import _host_malloc


GRAD_MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}


def time_pair(dense, compressed, x, *, min_run_time=1.0, rounds=3, num_threads=None, grad_mode="inference_mode"):
    """Median seconds per forward of both models and their ratio compressed / dense, under grad_mode
    ("inference_mode" or "no_grad": deployments use either, and per-call overheads differ between them)."""
    if grad_mode not in GRAD_MODES:
        raise ValueError("grad_mode must be one of %s, got %r" % (sorted(GRAD_MODES), grad_mode))
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
