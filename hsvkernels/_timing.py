"""Latency of one module on one input, for convert_(measure=True)."""
import torch
from torch.utils import benchmark


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
    with torch.no_grad():
        if x.is_cuda:
            replay = _graphed(module, x)
            if replay is not None:
                return _device_ms(replay, min_run_time)
        module(x)  # first call outside the timer: lazy init, allocator warm-up
        timer = benchmark.Timer("m(x)", globals={"m": module, "x": x}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


_GRAPH_REPS = 10   # calls per captured graph: a replay then lasts long enough to time with events


def _graphed(module, x):
    """A replay of module(x) x _GRAPH_REPS captured in a CUDA graph, or None where it cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            for _ in range(3):   # warm-up: cuDNN autotuning, HSV_CUDA_IMPL=auto's timing, packed factors
                module(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(_GRAPH_REPS):
                module(x)
    except RuntimeError:   # an op that cannot be captured: time it eagerly instead
        torch.cuda.synchronize()
        return None
    return graph.replay


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
