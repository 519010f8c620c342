"""Latency of one module on one input, for convert_(measure=True)."""
import torch
from torch.utils import benchmark


def latency_ms(module, x, min_run_time=0.05):
    """Median milliseconds per call of module(x), under no_grad.

    torch.utils.benchmark synchronises CUDA and warms up; its default of one
    thread would understate multithreaded CPU kernels, so the current count is used.
    """
    with torch.no_grad():
        module(x)  # first call outside the timer: lazy init, allocator warm-up
        timer = benchmark.Timer("m(x)", globals={"m": module, "x": x}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
