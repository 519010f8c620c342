"""Latency of one module on one input, for convert_(measure=True)."""
import torch
from torch.utils import benchmark

from ._args import check_seconds


def latency_ms(module, x, min_run_time=0.05):
    """Median milliseconds per call of module(x), under no_grad.

    On the CPU: wall time (torch.utils.benchmark warms up; its default of one
    thread would understate multithreaded kernels, so the current count is used).
    On a CUDA device: the device time of replays of a CUDA graph holding the
    call, so the layers are compared by their kernels and not by the Python
    and launch overhead of each module call (a factorized layer has more of
    it; at batch 32 on an H100 that alone made every layer lose to dense).
    That is the cost in a graph-replayed or compiled model; in a host-bound
    eager model it is only the part the factorization changes.
    """
    check_seconds("min_run_time", min_run_time)
    with torch.no_grad():
        if x.is_cuda:
            try:
                replay, _ = capture_graph(lambda: module(x), _GRAPH_REPS)
            except RuntimeError:   # an op that cannot be captured: time it eagerly instead
                torch.cuda.synchronize()
            else:
                return _device_ms(replay, min_run_time)
        module(x)  # first call outside the timer: lazy init, allocator warm-up
        timer = benchmark.Timer("m(x)", globals={"m": module, "x": x}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


_GRAPH_REPS = 10   # calls per captured graph: a replay then lasts long enough to time with events


def capture_graph(fn, reps=1, after_warmup=None):
    """fn() called `reps` times inside one CUDA graph, after three warm-up calls on a side stream
    (cuDNN autotuning, HSV_CUDA_IMPL=auto's timed choices, packed factors all happen there).
    Returns the graph's replay and the last captured call's output (refilled by every replay).
    after_warmup, if given, runs between warm-up and capture (to read what the warm-up chose)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if after_warmup is not None:
        after_warmup()
    graph = torch.cuda.CUDAGraph()
    out = None
    with torch.cuda.graph(graph):
        for _ in range(reps):
            out = fn()
    return graph.replay, out


def _device_ms(replay, min_run_time):
    """Median device milliseconds per call over replays timed with CUDA events, for about min_run_time seconds."""
    replay()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    budget_ms = 1e3 * min_run_time
    while len(times) < 5 or sum(times) * _GRAPH_REPS < budget_ms:
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / _GRAPH_REPS)
        if len(times) >= 1000:
            break
    times.sort()
    return times[len(times) // 2]
