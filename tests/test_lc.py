"""lc.train: the learning-compression algorithm, from random init to FactorizedConv2d layers."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from hsvkernels import FactorizedConv2d, data, lc, ranks
from hsvkernels.demo import SmallResNet
from hsvkernels.finetune import accuracy

pytest.importorskip("sklearn")   # the digits data set

# One LC run's settings for the digits tests: 10 L-steps of one epoch each, mu from
# 5e-3 to ~1 (growth 1.8); SGD lr 0.05 with Nesterov momentum. About 15 s on one core.
LC_SETTINGS = dict(ratio=4, steps=10, mu0=5e-3, mu_growth=1.8, lr=0.05, min_params=1000, progress=False)


@pytest.fixture(scope="module")
def digits():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_set, test_set = data.digits(size=16)
    yield train_set, test_set
    torch.set_num_threads(threads)


def loaders(train_set, test_set, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train_set, batch_size=64, shuffle=True, generator=gen),
            DataLoader(test_set, batch_size=360))


def small_resnet(seed=0):
    torch.manual_seed(seed)
    return SmallResNet(widths=(16, 32, 64))


@pytest.mark.slow
def test_tt_tucker_from_random_init_reaches_95_percent_on_digits(digits):
    train_loader, test_loader = loaders(*digits)
    model, history = lc.train(small_resnet(), train_loader, "tt_tucker",
                              eval_fn=lambda m: accuracy(m, test_loader), **LC_SETTINGS)
    assert [h["step"] for h in history] == list(range(11))
    assert history[0]["mu"] == 0 and history[0]["loss"] is None
    assert history[1]["mu"] == pytest.approx(5e-3) and history[-1]["mu"] == pytest.approx(5e-3 * 1.8 ** 9)
    # Random weights are far from the format; LC pulls w onto it.
    assert history[0]["rel_violation"] > 0.8
    assert history[-1]["rel_violation"] < 0.15
    assert history[-1]["accuracy"] >= 0.95
    assert history[0]["accuracy"] < 0.2                       # chance level before training
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, FactorizedConv2d))]
    factorized = [m for m in convs if isinstance(m, FactorizedConv2d)]
    assert len(factorized) == 7 and all(m.kind == "tt_tucker" for m in factorized)
    assert [m.weight.numel() for m in convs if isinstance(m, nn.Conv2d)] == [144, 512]   # stem, 1x1 shortcut
    for m in factorized:
        assert m.factorization.compression() >= 4
    # The returned model is Delta(Theta) of the last step (BN re-estimated on other batches).
    assert abs(accuracy(model, test_loader) - history[-1]["accuracy"]) <= 0.03


@pytest.mark.slow
def test_svd_lc_beats_direct_compression_with_the_same_budget(digits):
    train_loader, test_loader = loaders(*digits)
    model, history = lc.train(small_resnet(), train_loader, "svd", **LC_SETTINGS)
    lc_acc = accuracy(model, test_loader)
    assert all(m.kind == "svd" for m in model.modules() if isinstance(m, FactorizedConv2d))

    # Baseline: the same 10 epochs of the same SGD on the dense net, then compress directly.
    train_loader, _ = loaders(*digits)
    dense = small_resnet()
    torch.manual_seed(0)
    opt = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    dense.train()
    for _ in range(LC_SETTINGS["steps"]):
        for x, y in train_loader:
            loss = F.cross_entropy(dense(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for name, conv in list(dense.named_modules()):
        if isinstance(conv, nn.Conv2d) and conv.weight.numel() >= 1000:
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent) if parent else dense, child,
                    FactorizedConv2d.from_conv(conv, "svd", ratio=4))
    lc.recalibrate_bn(dense, train_loader, 20)
    direct_acc = accuracy(dense, test_loader)
    assert lc_acc >= 0.9 and lc_acc >= direct_acc + 0.2, (lc_acc, direct_acc)
    assert history[-1]["rel_violation"] < 0.2 * history[0]["rel_violation"]


def test_converges_to_the_eckart_young_solution():
    """With one-hot inputs, the half squared error of a 1x1 conv is ||W - W0||^2 / 2: the
    rank-r constrained optimum is then the truncated SVD of W0 (Eckart-Young)."""
    torch.manual_seed(0)
    cin = cout = 8
    w0 = torch.randn(cout, cin, 1, 1)
    x = torch.eye(cin).reshape(cin, cin, 1, 1)
    batches = [(x, F.conv2d(x, w0))] * 4
    model = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False))
    model, history = lc.train(model, batches, "svd", ranks=3, steps=25, mu0=1e-2, mu_growth=1.4, lr=0.3,
                              epochs_per_step=3, loss_fn=lambda out, y: 0.5 * (out - y).square().sum(),
                              min_params=0, progress=False)
    u, s, vh = torch.linalg.svd(w0.reshape(cout, cin))
    best = (u[:, :3] * s[:3]) @ vh[:3]
    got = model[0].weight.detach().reshape(cout, cin)
    assert isinstance(model[0], FactorizedConv2d) and model[0].meta["rank"] == 3
    assert torch.linalg.matrix_norm(got - best) < 1e-2 * torch.linalg.matrix_norm(best)
    assert history[-1]["violation"] < 1e-4 * max(h["violation"] for h in history)
    # mu reached 1e-2 * 1.4**24 ~ 32, where lr = 0.3 would diverge without the 1/mu cap.
    assert history[-1]["lr"] == pytest.approx(1 / history[-1]["mu"])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def _task(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


@pytest.mark.parametrize("method", ["tucker2", "ht2", "cp", "hsv"])
def test_other_methods_as_the_c_step_and_exp_range_clr(method):
    torch.manual_seed(0)
    model, history = lc.train(_Net(), _task(), method, ratio=2, steps=3, min_params=0, clr="exp_range",
                              progress=False)
    assert len(history) == 4 and all(math.isfinite(h["violation"]) for h in history)
    assert history[1]["lr"] > history[2]["lr"] > history[3]["lr"]      # exp_range: the mean lr decays
    assert isinstance(model.a, FactorizedConv2d) and model.a.kind == method and model.b.kind == method


def test_rank_sources_plan_dict_and_bayes_result():
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(2, 3, 8, 8)
    plan = ranks.select(net, "svd", ratio=2, example_input=x, allow_dense=False, progress=False)
    model, _ = lc.train(copy.deepcopy(net), _task(), "svd", ranks=plan, steps=1, progress=False)
    assert [model.a.meta["rank"], model.b.meta["rank"]] == [c.config["rank"] for c in plan.values()]

    model, _ = lc.train(copy.deepcopy(net), _task(), "tucker2", ranks={"b": (4, 3)}, steps=1, progress=False)
    assert isinstance(model.a, nn.Conv2d) and (model.b.meta["R_T"], model.b.meta["R_S"]) == (4, 3)

    pytest.importorskip("bayes_opt")
    found = ranks.bayes_opt(net, "tt_tucker", calibration=x, n_trials=3, progress=False)
    model, _ = lc.train(copy.deepcopy(net), _task(), "tt_tucker", ranks=found, steps=1, progress=False)
    assert model.b.meta["a"] == found.plan["b"].config["rank"][2]


def test_seed_makes_runs_repeatable():
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        net = _Net()
        loader = DataLoader(list(zip(*[torch.cat(t) for t in zip(*_task())])), batch_size=16, shuffle=True)
        runs.append(lc.train(net, loader, "svd", ratio=2, steps=2, min_params=0, seed=7, progress=False)[1])
    assert [h["loss"] for h in runs[0]] == [h["loss"] for h in runs[1]]


def test_argument_errors():
    task = _task(16)
    with pytest.raises(ValueError, match="unknown method"):
        lc.train(_Net(), task, "nope", ratio=2)
    with pytest.raises(ValueError, match="ratio= or ranks="):
        lc.train(_Net(), task, "svd")
    with pytest.raises(ValueError, match="ratio= or ranks="):
        lc.train(_Net(), task, "svd", ratio=2, ranks=3)
    with pytest.raises(ValueError, match="ratio must be"):
        lc.train(_Net(), task, "svd", ratio=0.5)
    with pytest.raises(ValueError, match="mu0"):
        lc.train(_Net(), task, "svd", ratio=2, mu0=0)
    with pytest.raises(ValueError, match="mu_growth"):
        lc.train(_Net(), task, "svd", ratio=2, mu_growth=0.5)
    with pytest.raises(ValueError, match="steps"):
        lc.train(_Net(), task, "svd", ratio=2, steps=0)
    with pytest.raises(ValueError, match="lr"):
        lc.train(_Net(), task, "svd", ratio=2, lr=-1)
    with pytest.raises(ValueError, match="clr must be"):
        lc.train(_Net(), task, "svd", ratio=2, clr="cosine", min_params=0)
    with pytest.raises(ValueError, match="no batches"):
        lc.train(_Net(), [], "svd", ratio=2)
    with pytest.raises(ValueError, match="not an nn.Conv2d"):
        lc.train(_Net(), task, "svd", ranks={"head": 2})
    with pytest.raises(ValueError, match="no layer to compress"):
        lc.train(_Net(), task, "svd", ratio=2, min_params=10 ** 6)
    with pytest.raises(TypeError, match="eval_fn"):
        lc.train(_Net(), task, "svd", ratio=2, eval_fn=3)
    with pytest.raises(ValueError, match="C-step of layer 'b'"):
        lc.train(_Net(), task, "svd", ranks={"b": 1000}, progress=False)


def test_bench_script_writes_the_curve(tmp_path):
    import json
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import lc_digits

    out = tmp_path / "lc"
    lc_digits.main(["--method", "svd", "--steps", "2", "--widths", "8,16,16", "--size", "8", "--out", str(out)])
    result = json.loads((tmp_path / "lc.json").read_text())
    assert [h["step"] for h in result["history"]] == [0, 1, 2]
    assert 0 <= result["summary"]["final_accuracy"] <= 1 and result["baseline"]["direct_accuracy"] >= 0
    text = (tmp_path / "lc.md").read_text()
    assert "Command:" in text and "Machine:" in text and "| 2 |" in text
    assert (tmp_path / "lc.png").stat().st_size > 1000
