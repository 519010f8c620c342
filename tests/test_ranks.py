"""hsvkernels.ranks: budgets met, determinism, sensitivities, speed, argument errors."""
import copy
import pickle
import sys
import time

import pytest
import torch
from torch import nn

import hsvkernels
from hsvkernels import ranks
from hsvkernels.decompose import METHODS, svd

torchvision = pytest.importorskip("torchvision")

# methods that offer candidates(); "hsv" joins when its module defines them
SELECTABLE = sorted(m for m in METHODS if hasattr(sys.modules[METHODS[m].__module__], "candidates"))


def _resnet_layers(name):
    """(weight, out_hw, in_hw) of every groups=1 conv of a random-init torchvision ResNet at 224x224.

    Sizes come from a forward pass on the meta device, which costs nothing.
    """
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    meta = copy.deepcopy(model).to("meta")
    sizes = ranks.conv_layers(meta, torch.empty(1, 3, 224, 224, device="meta"))
    weights = dict(model.named_modules())
    return [(weights[layer.name].weight.detach(), layer.out_hw, layer.in_hw) for layer in sizes]


@pytest.fixture(scope="module")
def resnet18_layers():
    return _resnet_layers("resnet18")


@pytest.fixture(scope="module")
def resnet50_layers():
    return _resnet_layers("resnet50")


def _check_budget(plan, ratio, macs_ratio):
    """Every target met, and the binding one by at most 2% more than asked (no budget wasted)."""
    achieved = []
    if ratio is not None:
        assert plan.compression() >= ratio
        achieved.append(plan.compression() / ratio)
    if macs_ratio is not None:
        assert plan.mac_reduction() >= macs_ratio
        achieved.append(plan.mac_reduction() / macs_ratio)
    assert min(achieved) <= 1.02, (plan.compression(), plan.mac_reduction())


@pytest.mark.parametrize("ratio,macs_ratio", [(2, None), (4, None), (None, 2), (None, 3), (3, 2)])
def test_budget_met_within_2_percent_resnet18(resnet18_layers, ratio, macs_ratio):
    plan = ranks.select(resnet18_layers, "svd", ratio=ratio, macs_ratio=macs_ratio, progress=False)
    assert len(plan) == len(resnet18_layers) == 20
    _check_budget(plan, ratio, macs_ratio)


@pytest.mark.parametrize("ratio,macs_ratio", [(3, None), (None, 2), (2.5, 2)])
def test_budget_met_within_2_percent_resnet50(resnet50_layers, ratio, macs_ratio):
    plan = ranks.select(resnet50_layers, "svd", ratio=ratio, macs_ratio=macs_ratio, progress=False)
    assert len(plan) == 53
    _check_budget(plan, ratio, macs_ratio)


def test_kcp_budget_met_on_resnet18_stage(resnet18_layers):
    layers = resnet18_layers[1:5]        # the first stage: four 64 -> 64 3x3 convs
    plan = ranks.select(layers, "kcp", ratio=4, progress=False)
    _check_budget(plan, 4, None)
    for (weight, _, _), choice in zip(layers, plan.values()):
        assert choice.macs <= choice.dense_macs          # ratio alone: never more MACs than dense
        if choice.method == "kcp":
            fact = hsvkernels.decompose(weight, "kcp", **choice.config)
            assert fact.num_params() == choice.params


def test_plan_fields_and_lower_error_for_looser_budget(resnet18_layers):
    tight = ranks.select(resnet18_layers, "svd", ratio=6, progress=False)
    loose = ranks.select(resnet18_layers, "svd", ratio=2, progress=False)
    assert loose.objective() < tight.objective()
    for name, c in tight.items():
        assert c.method in ("svd", "dense")
        assert c.params <= c.dense_params and 0 <= c.rel_err_sq <= 1
        if c.method == "svd":
            assert set(c.config) == {"rank"}


def test_deterministic(resnet18_layers):
    a = ranks.select(resnet18_layers, "svd", ratio=3, progress=False)
    b = ranks.select(resnet18_layers, "svd", ratio=3, progress=False)
    assert a == b


def test_svd_candidates_match_decompose():
    w = torch.randn(32, 16, 3, 3, dtype=torch.float64)
    cands = svd.candidates(w, (7, 7))
    assert [c.config["rank"] for c in cands][:16] == list(range(1, 16)) + [16]
    for c in cands[::5]:
        fact = hsvkernels.decompose(w, "svd", **c.config)
        assert fact.num_params() == c.params and fact.macs(7, 7) == c.macs
        assert abs(fact.relative_error(w) ** 2 - c.rel_err_sq) < 1e-9


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)     # not selected: grouped
        self.c = nn.Conv2d(32, 32, 3, padding=1)
        self.d = nn.Conv2d(32, 16, 1)

    def forward(self, x):
        for m in (self.a, self.b, self.dw, self.c, self.d):
            x = torch.relu(m(x))
        return x.mean((2, 3))


@pytest.mark.parametrize("method", SELECTABLE)
def test_model_selection_with_sensitivities_and_apply(method):
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(4, 3, 16, 16)
    plan = ranks.select(net, method, ratio=2, calibration=x, progress=False)
    assert list(plan) == ["a", "b", "c", "d"]
    assert plan.compression() >= 2
    assert any(c.sensitivity != 1.0 for c in plan.values())
    assert plan["b"].macs <= plan["b"].dense_macs and plan["c"].dense_macs == 32 * 32 * 9 * 8 * 8
    again = ranks.select(net, method, ratio=2, calibration=x, progress=False)
    assert again == plan
    with torch.no_grad():
        ref = net(x)
        out = ranks.apply(copy.deepcopy(net), plan)(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_explicit_sensitivities_steer_the_choice():
    torch.manual_seed(0)
    layers = [(torch.randn(32, 32, 3, 3), (8, 8)) for _ in range(2)]
    plan = ranks.select(layers, "svd", ratio=3, sensitivities=[100.0, 1.0], allow_dense=False, progress=False)
    assert plan["0"].rel_err_sq < plan["1"].rel_err_sq


def test_argument_errors():
    layers = [(torch.randn(8, 8, 3, 3), (4, 4))]
    with pytest.raises(ValueError, match=">= 1"):
        ranks.select(layers, "svd", ratio=0.5)
    with pytest.raises(ValueError, match="macs_ratio= and/or latency_ratio="):
        ranks.select(layers, "svd")
    with pytest.raises(ValueError, match="unknown method"):
        ranks.select(layers, "nope", ratio=2)
    with pytest.raises(ValueError, match="needs a model"):
        ranks.select(layers, "svd", ratio=2, calibration=torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="example_input"):
        ranks.select(_Net(), "svd", ratio=2)
    with pytest.raises(ValueError, match="budget out of reach"):
        ranks.select(layers, "svd", ratio=1000, allow_dense=False, progress=False)
    with pytest.raises(ValueError, match="one per layer"):
        ranks.select(layers, "svd", ratio=2, sensitivities=[1.0, 2.0], progress=False)


def _params_timer(calls):
    """A deterministic stand-in for the latency timer: "milliseconds" = the module's parameter count."""
    def timer(module, x):
        calls.append((type(module).__name__, tuple(x.shape)))
        return float(sum(p.numel() for p in module.parameters()))
    return timer


@pytest.mark.parametrize("method", ["svd", "hsv"])
def test_latency_budget_with_a_deterministic_timer(method):
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(2, 3, 16, 16)
    calls = []
    plan = ranks.select(net, method, latency_ratio=2, example_input=x, progress=False, latency_points=4,
                        timer=_params_timer(calls))
    assert list(plan) == ["a", "b", "c", "d"]
    assert plan.latency_reduction() >= 2
    for name, c in plan.items():
        conv = getattr(net, name)
        assert c.dense_latency_ms == conv.weight.numel() + conv.bias.numel()
        assert c.latency_ms == (c.dense_latency_ms if c.method == ranks.DENSE else c.params + conv.bias.numel())
    # each layer: its dense conv once and at most latency_points factorizations, on its own input size
    assert len(calls) <= 4 * (1 + 4)
    assert ("Conv2d", (2, 32, 8, 8)) in calls and all(shape[0] == 2 for _, shape in calls)
    # choosing among the timed options only can never beat choosing among all of them at the same budget
    by_params = ranks.select(net, method, ratio=2, example_input=x, progress=False)
    assert plan.objective() >= by_params.objective() - 1e-12
    with torch.no_grad():
        assert ranks.apply(copy.deepcopy(net), plan)(x).shape == net(x).shape
    # sensitivity-weighted: the probes pick options by their (millisecond) cost too
    weighted = ranks.select(net, method, latency_ratio=2, calibration=x, progress=False, latency_points=4,
                            timer=_params_timer([]))
    assert weighted.latency_reduction() >= 2 and any(c.sensitivity != 1.0 for c in weighted.values())


def test_latency_budget_on_a_channels_last_model():
    # hsv's 5-D factors cannot take Module.to(memory_format=channels_last): the timed modules must still be built
    torch.manual_seed(0)
    net = _Net().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    seen = []

    def timer(module, x):
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return float(sum(p.numel() for p in module.parameters()))
    plan = ranks.select(net, "hsv", latency_ratio=2, example_input=x, progress=False, latency_points=3, timer=timer)
    assert plan.latency_reduction() >= 2 and all(seen)


def test_latency_budget_keeps_layers_dense_where_factorizing_is_slower():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(2, 3, 16, 16)

    def slow_factorized(module, x):
        return 5.0 if isinstance(module, nn.Conv2d) else 7.0
    plan = ranks.select(net, "svd", latency_ratio=1, example_input=x, progress=False, timer=slow_factorized)
    assert all(c.method == ranks.DENSE for c in plan.values()) and plan.latency_reduction() == 1
    with pytest.raises(ValueError, match="latency reduction .*latency_ratio=1.2"):
        ranks.select(net, "svd", latency_ratio=1.2, example_input=x, progress=False, timer=slow_factorized)


def test_latency_budget_with_the_real_timer():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(2, 3, 16, 16)
    plan = ranks.select(net, "svd", ratio=1.5, latency_ratio=1.1, example_input=x, progress=False,
                        latency_points=2)
    assert plan.latency_reduction() >= 1.1 and plan.compression() >= 1.5
    assert all(c.latency_ms > 0 and c.dense_latency_ms > 0 for c in plan.values())


def test_latency_budget_argument_errors():
    layers = [(torch.randn(8, 8, 3, 3), (4, 4))]
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="needs a model"):
        ranks.select(layers, "svd", latency_ratio=2)
    with pytest.raises(ValueError, match="not both"):
        ranks.select(_Net(), "svd", macs_ratio=2, latency_ratio=2, example_input=x)
    with pytest.raises(ValueError, match="latency_ratio.*>= 1"):
        ranks.select(_Net(), "svd", latency_ratio=0.5, example_input=x)
    with pytest.raises(ValueError, match="latency_points"):
        ranks.select(_Net(), "svd", latency_ratio=2, example_input=x, latency_points=1)
    with pytest.raises(ValueError, match="example_input"):
        ranks.select(_Net(), "svd", latency_ratio=2)


@pytest.mark.slow
def test_resnet50_svd_selection_under_a_minute():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    start = time.perf_counter()
    plan = ranks.select(model, "svd", ratio=3, example_input=torch.randn(1, 3, 224, 224), progress=False)
    elapsed = time.perf_counter() - start
    assert len(plan) == 53 and plan.compression() >= 3
    assert elapsed < 60, elapsed


def test_svd_takes_macs_ratio():
    w = torch.randn(32, 16, 3, 3)
    fact = hsvkernels.decompose(w, "svd", macs_ratio=3)
    assert fact.dense_macs(5, 5) >= 3 * fact.macs(5, 5)
    assert fact.meta["rank"] == hsvkernels.decompose(w, "svd", ratio=3).meta["rank"]


@pytest.mark.parametrize("ratio,macs_ratio", [(4, None), (None, 2), (3, 2)])
def test_hsv_budget_met_within_2_percent_resnet18(resnet18_layers, ratio, macs_ratio):
    plan = ranks.select(resnet18_layers, "hsv", ratio=ratio, macs_ratio=macs_ratio, progress=False)
    assert len(plan) == 20
    _check_budget(plan, ratio, macs_ratio)
    # with only a parameter target, no layer may cost more MACs than its dense conv
    assert all(c.macs <= c.dense_macs for c in plan.values())


@pytest.mark.slow
def test_resnet50_hsv_selection_under_a_minute(resnet50_layers):
    start = time.perf_counter()
    plan = ranks.select(resnet50_layers, "hsv", ratio=4, macs_ratio=4, progress=False)
    elapsed = time.perf_counter() - start
    _check_budget(plan, 4, 4)
    assert elapsed < 60, elapsed


def test_a_latency_plan_hands_its_timed_layers_to_convert(monkeypatch):
    # the chosen factorizations were decomposed to be timed; convert_ and apply use them instead of decomposing again
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(2, 3, 16, 16)
    plan = ranks.select(net, "svd", latency_ratio=2, example_input=x, progress=False, latency_points=3,
                        timer=_params_timer([]))
    chosen = {name: c.built[0] for name, c in plan.items() if c.method != ranks.DENSE}
    assert chosen
    fresh = copy.deepcopy(net)   # other weights (equal values): decomposed anew
    copied = pickle.loads(pickle.dumps(plan))
    assert all(c.built is None for c in copied.values()) and copied == plan
    calls = []
    real = hsvkernels.FactorizedConv2d.from_conv.__func__
    monkeypatch.setattr(hsvkernels.FactorizedConv2d, "from_conv",
                        classmethod(lambda cls, *a, **k: calls.append(1) or real(cls, *a, **k)))
    hsvkernels.convert_(net, ranks=plan, example_input=x, progress=False)
    assert calls == [] and all(getattr(net, name) is layer for name, layer in chosen.items())
    hsvkernels.convert_(fresh, ranks=plan, example_input=x, progress=False)
    assert len(calls) == len(chosen)
    with torch.no_grad():
        torch.testing.assert_close(net(x), fresh(x))


def test_a_changed_weight_is_decomposed_again():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(2, 3, 16, 16)
    plan = ranks.select(net, "svd", latency_ratio=2, example_input=x, progress=False, latency_points=3,
                        timer=_params_timer([]))
    name = next(n for n, c in plan.items() if c.method != ranks.DENSE)
    timed = plan[name].built[0]
    getattr(net, name).weight.data.mul_(-2)   # .data: no version bump, the values decide
    want = hsvkernels.FactorizedConv2d.from_conv(getattr(net, name), "svd", **plan[name].config)
    ranks.apply(net, plan)
    assert getattr(net, name) is not timed
    torch.testing.assert_close(getattr(net, name).weight, want.weight)


def test_non_finite_calibration_and_sensitivities_are_refused():
    # One NaN in the batch made every layer's error NaN, and the allocation gave rank 1 everywhere, silently.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration contains NaN or Inf"):
        ranks.select(net, "svd", ratio=2, calibration=x, progress=False)
    with pytest.raises(ValueError, match="example_input contains NaN or Inf"):
        ranks.select(net, "svd", ratio=2, example_input=x, progress=False)
    with pytest.raises(ValueError, match="sensitivities must be 2 finite non-negative numbers"):
        ranks.select(net, "svd", ratio=2, example_input=x[1:], sensitivities=[float("nan"), 1.0], progress=False)
    with pytest.raises(ValueError, match="example_input contains NaN or Inf"):
        hsvkernels.convert_(net, "svd", ratio=2, example_input=x, progress=False)
