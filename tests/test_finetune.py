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
