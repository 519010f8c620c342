"""Epilogue fusion: a factorized conv's residual add and ReLU run inside its op (hsv::conv2d_epilogue).

In a ResNet most convs are followed by a ReLU, and every block's last conv by `+ identity` and a
ReLU. Run as separate ops, each is a full pass over the conv's output, and in eager mode a module
call too: on a compressed ResNet-50 at batch 1 (2-core EPYC) the adds and ReLUs took 7% of the
forward. `fuse_epilogues(model)` finds them on a torch.fx trace and hands them to the conv's op.

A conv's tail is fused only when the conv's output has no other user: conv -> ReLU,
conv -> add(other) and conv -> add(other) -> ReLU, where the add's result has no other user
either. Identity modules between them (FoldedBatchNorm, left by BN folding) are looked through;
an unfolded BatchNorm stops the pattern, so fold BNs first (convert_(..., fold_bn=True)).
"""
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._args import conv_out_size
from .fold import _Tracer
from .nn import FactorizedConv2d
from .ops import call_conv2d_epilogue


class EpilogueConv2d(FactorizedConv2d):
    """A FactorizedConv2d whose forward(input, residual=None) also adds `residual` and applies a ReLU
    (when `relu`). `adds` says whether the graph that made it passes a residual.

    It shares its parameters with the FactorizedConv2d it was made from (`from_factorized`), and
    its state_dict has the same keys, so it loads the unfused model's weights.
    """

    @classmethod
    def from_factorized(cls, conv, adds, relu):
        if type(conv) is not FactorizedConv2d:
            raise TypeError("from_factorized expects a FactorizedConv2d, got %s" % type(conv).__name__)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        state = {k: v for k, v in conv.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
        fused.__dict__.update(state)
        for name in ("_parameters", "_buffers", "_modules"):
            getattr(fused, name).update(getattr(conv, name))  # the same Parameter objects, so training updates both
        fused.adds, fused.relu = bool(adds), bool(relu)
        return fused

    def forward(self, input, residual=None):
        if self._explicit_pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            input = F.pad(input, self._explicit_pad, mode=mode)
        if residual is not None and not self._takes_residual(input, residual):
            # Something the add broadcasts or promotes (fx cannot see shapes): the unfused tail.
            y = super().forward(input) + residual
            return y.relu() if self.relu else y
        return call_conv2d_epilogue(input, self._factor_list(), self.bias, residual, self.stride, self._op_padding,
                                    self.dilation, 1, self.kind, self.relu)

    def _takes_residual(self, input, residual):
        if not isinstance(residual, torch.Tensor) or residual.dim() != 4 or input.dim() != 4:
            return False
        if residual.dtype != input.dtype or residual.device != input.device:
            return False
        out_hw = (conv_out_size(input.shape[2 + d], self.kernel_size[d], self.stride[d], self._op_padding[d],
                                self.dilation[d]) for d in range(2))
        return tuple(residual.shape) == (input.shape[0], self.out_channels, *out_hw)

    def extra_repr(self):
        return super().extra_repr() + ", epilogue=%s" % self.epilogue

    @property
    def epilogue(self):
        """'add', 'relu' or 'add+relu'."""
        return "+".join(part for part, on in (("add", self.adds), ("relu", self.relu)) if on)


_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {torch.relu, torch.relu_, F.relu}


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _added_to(node, value):
    """The other operand when `node` is value + other (or other + value), else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    if not ((node.op == "call_function" and node.target in _ADDS) or
            (node.op == "call_method" and node.target in ("add", "add_"))):
        return None
    a, b = node.args
    other = b if a is value else a if b is value else None
    return other if isinstance(other, fx.Node) and other is not value else None


def _is_relu_of(module, node, value):
    if len(node.args) != 1 or node.args[0] is not value:
        return False
    if set(node.kwargs) - {"inplace"}:
        return False
    if node.op == "call_module":
        return type(module.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELUS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def fuse_epilogues(model):
    """Returns a torch.fx.GraphModule computing what `model` computes, with each FactorizedConv2d whose
    output feeds only a residual add and/or a ReLU running them in its op (an EpilogueConv2d).

    The GraphModule shares its parameters with `model`, which is left as it was. Save and convert
    the model itself (io.save does not take GraphModules) and fuse after loading. Raises
    RuntimeError when torch.fx cannot trace the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError("fuse_epilogues expects an nn.Module, got %s" % type(model).__name__)
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx fails in many ways on data-dependent control flow
        raise RuntimeError("torch.fx could not trace %s (%s: %s)" % (type(model).__name__, type(exc).__name__,
                                                                     " ".join(str(exc).split())[:300])) from exc
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Fused")
    gm.training = model.training
    for node in list(gm.graph.nodes):  # identities between a conv and its tail (folded BNs)
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity) and \
                len(node.args) == 1 and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        if type(gm.get_submodule(node.target)) is not FactorizedConv2d:
            continue
        tail, residual, relu = node, None, False
        user = _only_user(tail)
        if user is not None and _added_to(user, tail) is not None:
            residual, tail = _added_to(user, tail), user
            user = _only_user(tail)
        if user is not None and _is_relu_of(gm, user, tail):
            relu, tail = True, user
        if tail is node:
            continue
        conv = gm.get_submodule(node.target)
        gm.set_submodule(node.target, EpilogueConv2d.from_factorized(conv, residual is not None, relu))
        with gm.graph.inserting_before(tail):  # after the residual, which may be computed after the conv
            fused = gm.graph.call_module(node.target, (node.args[0],) + ((residual,) if residual is not None else ()))
        tail.replace_all_uses_with(fused)
        while tail is not node:  # erase the tail back to the conv; each node has its successor as only user
            prev = tail.args[0] if tail.args[0] is not residual else tail.args[1]
            gm.graph.erase_node(tail)
            tail = prev
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def fused_epilogues(model):
    """{module name: 'add', 'relu' or 'add+relu'} of the EpilogueConv2d modules in a (fused) model."""
    return {name: m.epilogue for name, m in model.named_modules() if isinstance(m, EpilogueConv2d)}
