"""finetune: a converted model trains through hsv::conv2d's autograd."""
import copy

import pytest
import torch
from torch import nn

from hsvkernels import FactorizedConv2d, convert_
from hsvkernels.finetune import accuracy, finetune


def task(n=256, seed=0):
    """Two classes told apart by the sign of the mean of channel 0: easy, but only after training."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def net():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2))


def test_finetune_recovers_accuracy():
    torch.manual_seed(0)
    model = net()
    teacher = copy.deepcopy(model)
    convert_(model, "svd", ratio=2, min_params=100, example_input=torch.randn(1, 3, 8, 8), progress=False,
             decompose_threads=1)
    assert isinstance(model[2], FactorizedConv2d)
    data = task()
    before = accuracy(model, data)
    losses = finetune(model, data * 4, lr=3e-3, progress=False)
    assert len(losses) == 32 and sum(losses[-4:]) < sum(losses[:4])
    assert accuracy(model, data) > max(before, 0.8)
    # Distillation-only runs too (alpha=1 ignores the labels' loss).
    kd = finetune(model, data, teacher=teacher, alpha=1.0, max_steps=3, progress=False)
    assert len(kd) == 3 and all(v >= 0 for v in kd)


def test_factors_only_freezes_the_rest():
    model = net()
    convert_(model, "svd", ratio=2, min_params=100, progress=False, decompose_threads=1)
    head = model[7].weight.detach().clone()
    factor = model[2].factors[0].detach().clone()
    finetune(model, task(64), factors_only=True, lr=1e-2, progress=False)
    assert torch.equal(model[7].weight, head) and not torch.equal(model[2].factors[0], factor)
    assert model[7].weight.requires_grad  # restored afterwards
    with pytest.raises(ValueError, match="no FactorizedConv2d"):
        finetune(net(), task(32), factors_only=True, progress=False)


def shuffled_loader(seed_data=0):
    from torch.utils.data import DataLoader, TensorDataset
    xs, ys = zip(*task(128, seed_data))
    return DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=16, shuffle=True)


def test_deterministic_under_a_seed():
    # Shuffling and dropout both draw from torch's generator: the seed must fix them.
    torch.manual_seed(0)
    base = nn.Sequential(*net()[:7], nn.Dropout(0.5), net()[7])
    convert_(base, "svd", ratio=2, min_params=100, progress=False, decompose_threads=1)
    runs = []
    for seed in (1, 1, 2):
        model = copy.deepcopy(base)
        torch.manual_seed(1234 + len(runs))  # whatever state the caller left behind
        losses = finetune(model, shuffled_loader(), epochs=2, lr=1e-2, progress=False, seed=seed)
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    (l1, p1), (l2, p2), (l3, _) = runs
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert l1 != l3


def test_progress_bar_on_a_terminal(monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    model = net()
    finetune(model, task(64), max_steps=2, progress=True)
    assert "finetune" in term.getvalue() and "batch" in term.getvalue()
    term.truncate(0)
    finetune(model, task(64), max_steps=2, progress=False)
    assert term.getvalue() == ""
