"""Batch-norm folding: merge an eval-mode BatchNorm2d into the conv whose output it normalises.

In eval mode a BatchNorm2d is a per-channel affine map, y = s * (x - mean) + beta
with s = gamma / sqrt(var + eps), so conv -> bn equals one conv with weight
W * s (per output channel) and bias (b - mean) * s + beta. Folding before
factorizing lets the factors absorb the scale, and removes the BN pass.

Pairs are found on a torch.fx trace of the model, never guessed from module
order: a BN folds only when its sole input is a conv's output, that output has
no other user, and each of the two modules is called exactly once. The BN is
replaced by FoldedBatchNorm (an nn.Identity that remembers the conv), which is
how io.save records the fold.
"""
import torch
from torch import fx, nn

from .nn import FactorizedConv2d


class FoldedBatchNorm(nn.Identity):
    """Stands where a BatchNorm2d was folded into the conv named `into` (relative to the model root)."""

    def __init__(self, into):
        super().__init__()
        self.into = into

    def extra_repr(self):
        return "folded into %r" % self.into


class _Tracer(fx.Tracer):
    # Factorized layers run a custom op; treat them as opaque, like nn.Conv2d.
    def is_leaf_module(self, m, qualname):
        return isinstance(m, FactorizedConv2d) or super().is_leaf_module(m, qualname)


def conv_bn_pairs(model):
    """[(conv name, bn name)] of every BatchNorm2d that exclusively consumes an nn.Conv2d's output.

    Raises RuntimeError (with torch.fx's reason) when the model cannot be traced.
    BNs without running statistics (track_running_stats=False) are not foldable and left out.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx fails in many ways on data-dependent control flow
        raise RuntimeError("torch.fx could not trace %s (%s: %s)" % (type(model).__name__, type(exc).__name__,
                                                                     " ".join(str(exc).split())[:300])) from exc
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), nn.BatchNorm2d):
            continue
        bn = model.get_submodule(node.target)
        if bn.running_mean is None or bn.running_var is None or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        if type(model.get_submodule(src.target)) is not nn.Conv2d:  # subclasses may do more than convolve
            continue
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_into_conv_(conv, bn):
    """Scales conv's weight per output channel and sets its bias so that conv == bn(conv(.)) in eval mode."""
    if bn.num_features != conv.out_channels:
        raise ValueError("cannot fold %s into a conv with %d output channels" % (bn, conv.out_channels))
    w = conv.weight
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
    new_bias = (bias - mean) * scale + beta
    w.copy_((w.double() * scale.reshape(-1, 1, 1, 1)).to(w.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
    else:
        conv.bias.copy_(new_bias.to(conv.bias.dtype))


def replace_module(model, old, new):
    """Points every attribute of model's modules that holds `old` (a module may be shared) at `new`."""
    for parent in model.modules():
        for key, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, key, new)


def fold_batch_norms_(model, convs=None):
    """Folds every BatchNorm2d that exclusively follows an nn.Conv2d (one of `convs` when given) into it, in place.

    Each folded BN is replaced by a FoldedBatchNorm. Uses running statistics, so
    the result equals the model in eval mode. Returns [(conv name, bn name)] of
    the folds; raises RuntimeError (from conv_bn_pairs) when fx cannot trace the model.
    """
    folded = []
    for conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if convs is not None and conv not in convs:
            continue
        fold_into_conv_(conv, bn)
        identity = FoldedBatchNorm(conv_name)
        identity.train(bn.training)
        replace_module(model, bn, identity)
        folded.append((conv_name, bn_name))
    return folded


def folds_of(model):
    """[(bn name, conv name)] recorded by the FoldedBatchNorm modules of a model."""
    return [(name, m.into) for name, m in model.named_modules() if isinstance(m, FoldedBatchNorm)]
