"""hsvkernels.benchmark.layer_times: each conv's time inside a model's forward and alone."""
import time

import pytest
import torch
from conftest import requires_cuda
from torch import nn

from hsvkernels import benchmark, convert
from hsvkernels.epilogue import fuse_epilogues
from hsvkernels.fold import fold_batch_norms_


class SlowConv(nn.Conv2d):
    """A conv that takes at least `delay` seconds per call, so its share of the forward is known."""

    delay = 0.05   # well above a fast conv on a loaded 2-core machine (0.016 s seen under a parallel build)

    def forward(self, x):
        time.sleep(self.delay)
        return super().forward(x)


def small_net(slow_at=None):
    convs = [nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 16, 1)]
    if slow_at is not None:
        c = convs[slow_at]
        convs[slow_at] = SlowConv(c.in_channels, c.out_channels, c.kernel_size, padding=c.padding)
    return nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2]).eval()


def test_the_time_goes_to_the_layer_that_took_it():
    torch.manual_seed(0)
    net = small_net(slow_at=1)
    t = benchmark.layer_times({"net": net}, torch.randn(1, 3, 8, 8), runs=3, warmup=1)["net"]
    layers = t["layers"]
    assert list(layers) == ["0", "2", "4"]
    assert layers["2"]["in_model_s"] >= SlowConv.delay and layers["2"]["alone_s"] >= SlowConv.delay
    assert layers["0"]["in_model_s"] < SlowConv.delay and layers["4"]["in_model_s"] < SlowConv.delay
    assert t["forward_s"] >= SlowConv.delay   # the plain forwards include the slow conv too
    assert layers["2"]["input"] == [1, 32, 8, 8] and layers["4"]["input"] == [1, 32, 8, 8]


def test_factorized_and_epilogue_models_are_broken_down_by_conv():
    torch.manual_seed(0)
    dense = small_net()
    comp = small_net()
    comp.load_state_dict(dense.state_dict())
    fold_batch_norms_(comp)
    convert.convert_(comp, "svd", ratio=2, progress=False)
    fused = fuse_epilogues(comp)
    x = torch.randn(2, 3, 8, 8)
    t = benchmark.layer_times({"dense": dense, "compressed": comp, "fused": fused}, x, runs=2, warmup=1)
    factorized = [n for n, m in comp.named_modules() if type(m).__name__ == "FactorizedConv2d"]
    assert factorized == ["2"], factorized   # the others are below convert_'s min_params
    for label in t:
        assert set(t[label]["layers"]) == {"0", "2", "4"}, label
        for name, v in t[label]["layers"].items():
            assert v["in_model_s"] > 0 and v["alone_s"] > 0, (label, name)
    no_alone = benchmark.layer_times({"fused": fused}, x, runs=1, warmup=0, alone=False)["fused"]
    assert all(v["alone_s"] is None for v in no_alone["layers"].values())


def test_a_conv_called_twice_counts_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = SlowConv(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x))

    t = benchmark.layer_times({"net": Twice().eval()}, torch.randn(1, 8, 8, 8), runs=2, warmup=0)["net"]
    layer = t["layers"]["conv"]
    assert layer["in_model_s"] >= 2 * SlowConv.delay and SlowConv.delay <= layer["alone_s"] < 2 * SlowConv.delay


def test_hooks_are_removed_and_outputs_unchanged():
    torch.manual_seed(0)
    net = small_net()
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        before = net(x)
    benchmark.layer_times({"net": net}, x, runs=1, warmup=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    with torch.inference_mode():
        assert torch.equal(net(x), before)


def test_bad_arguments_are_named():
    net = small_net()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="models must be a non-empty dict"):
        benchmark.layer_times(net, x)
    with pytest.raises(ValueError, match="runs must be an int >= 1"):
        benchmark.layer_times({"net": net}, x, runs=0)
    with pytest.raises(TypeError, match="x must be the models' input tensor, got list"):
        benchmark.layer_times({"net": net}, [x])
    with pytest.raises(TypeError, match="model 'f' must be an nn.Module, got function"):
        benchmark.layer_times({"f": lambda t: t}, x)
    with pytest.raises(ValueError, match="has no nn.Conv2d"):
        benchmark.layer_times({"mlp": nn.Sequential(nn.Flatten(), nn.Linear(192, 2))}, x)
    with pytest.raises(ValueError, match="grad_mode must be one of"):
        benchmark.layer_times({"net": net}, x, grad_mode="train")
    compiled = torch.compile(net)
    with pytest.raises(ValueError, match="torch.compile'd"):
        benchmark.layer_times({"net": compiled}, x)


@requires_cuda
def test_cuda_layer_times_use_device_time():
    torch.manual_seed(0)
    net = small_net().cuda()
    t = benchmark.layer_times({"net": net}, torch.randn(4, 3, 32, 32, device="cuda"), runs=3, warmup=1)["net"]
    assert all(v["in_model_s"] > 0 and v["alone_s"] > 0 for v in t["layers"].values())
    assert t["forward_s"] > 0
