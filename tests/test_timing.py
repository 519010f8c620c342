"""hsvkernels._timing.latency_ms, which convert_(measure=True) decides by."""
import math

import pytest
import torch
from conftest import requires_cuda
from torch import nn

from hsvkernels._timing import latency_ms


def test_cpu_latency_is_wall_time_of_the_call():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 16, 16)
    fast = latency_ms(conv, x, min_run_time=0.02)
    slow = latency_ms(nn.Sequential(*[conv] * 20), x, min_run_time=0.02)
    assert 0 < fast < slow and math.isfinite(slow)


@requires_cuda
@pytest.mark.cuda
def test_cuda_latency_is_device_time_from_a_graph():
    # Twenty convs in a row take longer than one: the graph holds every call.
    conv = nn.Conv2d(64, 64, 3, padding=1).cuda()
    x = torch.randn(8, 64, 28, 28, device="cuda")
    one = latency_ms(conv, x, min_run_time=0.02)
    twenty = latency_ms(nn.Sequential(*[conv] * 20), x, min_run_time=0.02)
    assert 0 < one < twenty and math.isfinite(twenty)


class _Syncs(nn.Module):
    """A module that cannot be captured in a CUDA graph (it reads a value back to the host)."""

    def forward(self, x):
        return x * float(x.sum().item() != 0)


@requires_cuda
@pytest.mark.cuda
def test_cuda_latency_falls_back_to_eager_when_capture_fails():
    x = torch.randn(4, 4, device="cuda")
    ms = latency_ms(_Syncs(), x, min_run_time=0.01)
    assert ms > 0 and math.isfinite(ms)
    assert torch.cuda.current_stream().query()   # the stream is usable again
    assert (x + 1).sum().item() != 0


def test_time_pair_runs_under_the_grad_mode_asked_for():
    from hsvkernels import benchmark
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
            return x * 2

    for mode, expected in (("inference_mode", (False, True)), ("no_grad", (False, False))):
        seen.clear()
        t = benchmark.time_pair(Probe(), Probe(), torch.ones(2), min_run_time=0.003, rounds=1, grad_mode=mode)
        assert t["ratio"] > 0 and set(seen) == {expected}
    with pytest.raises(ValueError, match="grad_mode must be one of \\['inference_mode', 'no_grad'\\], got 'eval'"):
        benchmark.time_pair(Probe(), Probe(), torch.ones(2), grad_mode="eval")


def test_timing_budgets_must_be_finite_seconds():
    # NaN or inf seconds kept torch.utils.benchmark's blocked_autorange running forever
    from hsvkernels import _timing, benchmark
    net, x = torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)
    for bad in (float("nan"), float("inf"), 0, -1.0, "1"):
        with pytest.raises(ValueError, match="min_run_time must be a finite number of seconds > 0"):
            benchmark.time_pair(net, net, x, min_run_time=bad)
        with pytest.raises(ValueError, match="min_run_time must be a finite number of seconds > 0"):
            _timing.latency_ms(net, x, min_run_time=bad)
    with pytest.raises(ValueError, match="rounds must be an int >= 1, got 0"):
        benchmark.time_pair(net, net, x, min_run_time=0.01, rounds=0)
    with pytest.raises(ValueError, match="runs must be an int >= 1, got 1.5"):
        benchmark.layer_times({"net": net}, x, runs=1.5)
