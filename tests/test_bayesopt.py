"""ranks.bayes_opt: GP + EI rank search around EVBMF; determinism, budget, optimum, custom objective, errors."""
import copy
import math
import sys

import pytest
import torch
from torch import nn

from hsvkernels import FactorizedConv2d, bayesopt, convert_, ranks

pytest.importorskip("bayes_opt")


def known_rank_conv(cout=48, cin=40, rt=16, rs=12, noise=0.02, seed=0):
    """A conv (in a Sequential) whose kernel is Tucker-2 at (rt, rs) with a decaying core, plus a little noise.

    The decay makes the best trade-off of error against cost an interior rank pair
    that moves with lam, below the EVBMF ranks; the noise keeps EVBMF honest.
    """
    g = torch.Generator().manual_seed(seed)
    u_t = torch.linalg.qr(torch.randn(cout, rt, generator=g, dtype=torch.float64))[0]
    u_s = torch.linalg.qr(torch.randn(cin, rs, generator=g, dtype=torch.float64))[0]
    decay_t = 0.8 ** torch.arange(rt, dtype=torch.float64)
    decay_s = 0.8 ** torch.arange(rs, dtype=torch.float64)
    core = torch.randn(rt, rs, 3, 3, generator=g, dtype=torch.float64) * decay_t[:, None, None, None] \
        * decay_s[None, :, None, None]
    w = torch.einsum("cdij,tc,sd->tsij", core, u_t, u_s)
    w = w / w.norm() + noise * torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64) / math.sqrt(w.numel())
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w.float())
    return nn.Sequential(conv)


def calibration(cin=40, seed=1):
    return torch.randn(8, cin, 8, 8, generator=torch.Generator().manual_seed(seed))


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.c = nn.Conv2d(24, 24, 3, padding=1)

    def forward(self, x):
        for m in (self.a, self.b, self.c):
            x = torch.relu(m(x))
        return x.mean((2, 3))


def test_finds_the_grid_optimum_and_beats_the_evbmf_point():
    model, x, lam = known_rank_conv(), calibration(), 1.0
    result = ranks.bayes_opt(model, "tucker2", calibration=x, lam=lam, n_trials=20, progress=False)
    assert result.evbmf_ranks == {"0": (16, 12)}            # EVBMF recovers the planted ranks
    start = result.history[0]
    assert start["ranks"] == {"0": (16, 12)} and start["multipliers"] == {"R_T": 1.0, "R_S": 1.0}

    # Every rank pair reachable within the bounds [0.25, 2] x EVBMF, evaluated exhaustively.
    evaluator = bayesopt._Evaluator("tucker2", ranks._as_layers(model, x), model, x)
    grid = {}
    for rt in range(4, 33):
        for rs in range(3, 25):
            plan = evaluator.plan([(rt, rs)])
            grid[(rt, rs)] = evaluator.error(plan) + lam * bayesopt._cost_ratio(plan, "params")
    grid_best = min(grid.values())
    assert min(grid, key=grid.get) != (16, 12)               # the optimum is not the start point
    best = result.best["objective"]
    assert best < start["objective"] - 0.02                  # strictly better than EVBMF, by a margin
    assert best <= grid_best * 1.03, (result.best["ranks"], best, min(grid, key=grid.get), grid_best)
    # The reported objective is what the plan's ranks give.
    (ranks_best,) = result.best["ranks"].values()
    assert best == pytest.approx(grid[ranks_best], rel=1e-9)
    assert result.plan["0"].config == {"rank": ranks_best}
    assert result.best["error"] + lam * result.best["cost_ratio"] == pytest.approx(best)


def test_larger_lam_gives_cheaper_ranks():
    model, x = known_rank_conv(), calibration()
    cheap = ranks.bayes_opt(model, "tucker2", calibration=x, lam=3.0, n_trials=15, progress=False)
    rich = ranks.bayes_opt(model, "tucker2", calibration=x, lam=0.1, n_trials=15, progress=False)
    assert cheap.plan.params() < rich.plan.params()
    assert cheap.best["error"] > rich.best["error"]


def test_deterministic_under_seed_and_bounded():
    torch.manual_seed(0)
    model, x = known_rank_conv(seed=3), calibration()
    runs = [ranks.bayes_opt(model, "tt_tucker", calibration=x, n_trials=9, n_initial=3, seed=5, progress=False)
            for _ in range(2)]
    assert [h["multipliers"] for h in runs[0].history] == [h["multipliers"] for h in runs[1].history]
    assert [h["objective"] for h in runs[0].history] == [h["objective"] for h in runs[1].history]
    assert runs[0].plan == runs[1].plan
    assert len(runs[0].history) == 9 and [h["trial"] for h in runs[0].history] == list(range(9))
    assert set(runs[0].history[1]["multipliers"]) == {"R_T", "R_S", "a"}
    for h in runs[0].history:                                # every multiplier within the bounds
        assert all(0.25 - 1e-9 <= b <= 2.0 + 1e-9 for b in h["multipliers"].values())


def test_custom_objective_is_honoured_and_called_at_most_n_trials_times():
    model = SmallNet()
    x = torch.randn(2, 3, 16, 16)
    calls = []

    def objective(plan):        # prefer plans of about 1500 parameters, whatever their error
        calls.append(plan)
        return abs(plan.params() - 1500) / 1500

    result = ranks.bayes_opt(model, "ht2", example_input=x, objective=objective, n_trials=12, per="global",
                             bounds=(0.5, 8.0), progress=False)
    assert 1 <= len(calls) <= 12
    assert len(calls) == sum(not h["cached"] for h in result.history)
    assert all(h["error"] is None for h in result.history)
    assert result.best["objective"] == min(h["objective"] for h in result.history)
    assert result.best["objective"] == pytest.approx(objective(result.plan))
    assert result.best["objective"] < result.history[0]["objective"]
    assert list(result.plan) == ["a", "b", "c"]


def test_per_layer_space_and_the_plan_applies():
    torch.manual_seed(0)
    model, x = SmallNet(), torch.randn(4, 3, 16, 16)
    result = ranks.bayes_opt(model, "tt_tucker", calibration=x, n_trials=6, per="layer", progress=False)
    assert set(result.history[0]["multipliers"]) == {"a", "b", "c"}
    applied = ranks.apply(copy.deepcopy(model), result.plan)
    assert all(isinstance(getattr(applied, n), FactorizedConv2d) for n in "abc")
    converted = copy.deepcopy(model)
    convert_(converted, "tt_tucker", overrides=result.overrides(), min_params=0, example_input=x, progress=False)
    for n in "abc":
        r_t, r_s, a = result.plan[n].config["rank"]
        assert getattr(converted, n).meta["R_T"] == r_t and getattr(converted, n).meta["a"] == a
    with torch.no_grad():
        torch.testing.assert_close(applied(x), converted(x))
        # The default objective's error term is the output error of exactly this model.
        ref = model(x).double()
        err = ((applied(x).double() - ref).square().sum() / ref.square().sum()).item()
    assert err == pytest.approx(result.best["error"], rel=1e-4, abs=1e-7)


def test_layer_list_uses_the_weight_error():
    layers = [(known_rank_conv()[0].weight, (8, 8))]
    result = ranks.bayes_opt(layers, "tucker2", lam=1.0, n_trials=8, progress=False)
    choice = result.plan["0"]
    assert result.best["error"] == pytest.approx(choice.rel_err_sq)


def test_argument_errors():
    model, x = SmallNet(), torch.randn(1, 3, 8, 8)
    layers = [(torch.randn(8, 8, 3, 3), (4, 4))]
    with pytest.raises(ValueError, match="EVBMF rank rule"):
        ranks.bayes_opt(layers, "svd")
    with pytest.raises(ValueError, match="n_trials must be an int >= 1"):
        ranks.bayes_opt(layers, "tucker2", n_trials=0)
    with pytest.raises(ValueError, match="n_initial"):
        ranks.bayes_opt(layers, "tucker2", n_initial=-1)
    with pytest.raises(ValueError, match="bounds"):
        ranks.bayes_opt(layers, "tucker2", bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="bounds"):
        ranks.bayes_opt(layers, "tucker2", bounds=3)
    with pytest.raises(ValueError, match="lam"):
        ranks.bayes_opt(layers, "tucker2", lam=-1)
    with pytest.raises(ValueError, match="cost"):
        ranks.bayes_opt(layers, "tucker2", cost="flops")
    with pytest.raises(ValueError, match="per must be"):
        ranks.bayes_opt(layers, "tucker2", per="block")
    with pytest.raises(ValueError, match="seed"):
        ranks.bayes_opt(layers, "tucker2", seed=-1)
    with pytest.raises(TypeError, match="objective must be a callable"):
        ranks.bayes_opt(layers, "tucker2", objective=3)
    with pytest.raises(ValueError, match="needs a model"):
        ranks.bayes_opt(layers, "tucker2", calibration=torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="give calibration="):
        ranks.bayes_opt(model, "tucker2")
    with pytest.raises(ValueError, match="must be finite"):
        ranks.bayes_opt(model, "tucker2", example_input=x, objective=lambda plan: float("nan"), progress=False)


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bayes_opt", None)     # makes `import bayes_opt` raise ImportError
    with pytest.raises(ImportError, match=r"hsvkernels\[bayes\]"):
        ranks.bayes_opt([(torch.randn(8, 8, 3, 3), (4, 4))], "tucker2", progress=False)
