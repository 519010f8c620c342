"""finetune(model, loader, ...): recover accuracy after convert_ with a short training run.

Low-rank truncation loses most of its accuracy in the first layers it touches;
a few epochs of training, optionally distilling from the original dense model
(teacher), recover much of it. This is a plain loop, not a trainer framework.
"""
import torch
import torch.nn.functional as F

from ._progress import progress as progress_bar
from .nn import FactorizedConv2d


def finetune(model, loader, *, epochs=1, lr=1e-3, teacher=None, alpha=0.5, temperature=4.0, factors_only=False,
             max_steps=None, device=None, optimizer=None, progress=True, seed=None):
    """Trains `model` in place on (input, label) batches from `loader`; returns the per-step losses.

    teacher: a model (e.g. the dense original) whose softened outputs the student
        also matches: loss = (1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher || student).
    factors_only: train only the FactorizedConv2d factors, freezing everything else.
    optimizer: an optimizer to use instead of the default Adam(lr) over the trained parameters.
    max_steps: stop after this many batches in total.
    seed: seeds torch's global generator first, which also drives DataLoader
        shuffling (when the loader has no generator of its own) and dropout, so
        two runs from the same model with the same seed give the same result.
    progress: a tqdm bar per epoch (hidden when stderr is not a terminal).
    """
    if not 0 <= alpha <= 1:
        raise ValueError("alpha must be in [0, 1], got %r" % (alpha,))
    if seed is not None:
        torch.manual_seed(seed)
    if device is not None:
        model.to(device)
        if teacher is not None:
            teacher.to(device)
    if factors_only:
        params = [p for m in model.modules() if isinstance(m, FactorizedConv2d) for p in m.factors]
        if not params:
            raise ValueError("factors_only=True but the model has no FactorizedConv2d layers (run convert_ first)")
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = torch.optim.Adam(params, lr=lr)
    trained = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in trained and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    if teacher is not None:
        teacher.eval()

    losses = []
    model.train()
    try:
        for _ in range(epochs):
            for x, y in progress_bar(loader, progress, "finetune", "batch"):
                if device is not None:
                    x, y = x.to(device), y.to(device)
                logits = model(x)
                loss = F.cross_entropy(logits, y) if alpha < 1 else logits.new_zeros(())
                if teacher is not None and alpha > 0:
                    with torch.no_grad():
                        target = F.softmax(teacher(x) / temperature, dim=1)
                    kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="batchmean")
                    loss = (1 - alpha) * loss + alpha * temperature ** 2 * kd
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if max_steps is not None and len(losses) >= max_steps:
                    return losses
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return losses


def accuracy(model, loader, device=None):
    """Top-1 accuracy of `model` over (input, label) batches."""
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            if device is not None:
                x, y = x.to(device), y.to(device)
            correct += (model(x).argmax(1) == y).sum().item()
            total += y.numel()
    return correct / max(total, 1)
