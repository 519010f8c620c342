"""save(model, dir) / load(dir): a converted model as a JSON plan plus safetensors weights.

A converted model's structure depends on ranks chosen at conversion time, so its
state_dict alone is not enough to rebuild it. The plan (hsv_plan.json) records,
for every FactorizedConv2d, its kind, meta, conv hyper-parameters and factor
shapes; load() rebuilds those layers into a fresh dense architecture with
placeholder factors (no decomposition) and then loads every tensor strictly from
model.safetensors. BatchNorm layers folded by convert_(fold_bn=True) are listed
in the plan's "bn_folds" (format version 2): load() replaces them with identities
and gives their convs a bias, so the folded weights fit. No pickles: nothing in a
save directory runs code on load.
"""
import collections
import hashlib
import json
import os

import torch
from torch import nn

from . import models
from .factorization import Factorization
from .fold import FoldedBatchNorm, folds_of, replace_module
from .nn import FactorizedConv2d
from .report import Report, _jsonable

PLAN_FILE = "hsv_plan.json"
WEIGHTS_FILE = "model.safetensors"
REPORT_FILE = "report.json"
FORMAT = "hsvkernels.compressed"
FORMAT_VERSION = 2  # 2 adds "bn_folds"; saves without folds are still written as 1, for older readers


class SaveFileError(ValueError):
    """A save directory is missing, corrupt, or does not fit the model it is loaded into."""


def save(model, directory, *, model_ref=None, report=None):
    """Writes `model` (converted or not) to `directory`: hsv_plan.json, model.safetensors[, report.json].

    model_ref: e.g. "torchvision:resnet18", so that load() can rebuild the
    architecture itself; defaults to the reference of models built by
    hsvkernels.models.build (the CLI does this). Returns the plan dict.
    """
    from safetensors.torch import save_model

    from . import __version__
    from .epilogue import EpilogueConv2d

    if any(isinstance(m, EpilogueConv2d) for m in model.modules()):
        # the fused GraphModule has lost the modules that record BN folds, and load() rebuilds the architecture
        raise ValueError("save: the model went through fuse_epilogues; save the model it was made from, and fuse "
                         "again after load()")
    os.makedirs(directory, exist_ok=True)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    # save_model drops tensors that share storage (tied weights) and records them in
    # the metadata; plain save_file would refuse them.
    save_model(model, weights_path, metadata={"format": FORMAT})
    folds = [{"bn": bn, "conv": conv} for bn, conv in folds_of(model)]
    plan = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if folds else 1,
        "hsvkernels_version": __version__,
        "torch_version": torch.__version__,
        "model": model_ref or models.ref_of(model),
        "model_class": "%s.%s" % (type(model).__module__, type(model).__qualname__),
        "weights": WEIGHTS_FILE,
        "weights_sha256": _sha256(weights_path),
        "layers": [_layer_plan(name, m) for name, m in model.named_modules() if isinstance(m, FactorizedConv2d)],
    }
    if folds:
        plan["bn_folds"] = folds
    with open(os.path.join(directory, PLAN_FILE), "w") as f:
        json.dump(_jsonable(plan), f, indent=2)
        f.write("\n")
    report_path = os.path.join(directory, REPORT_FILE)
    if report is not None:
        report.to_json(report_path)
    elif os.path.exists(report_path):
        os.remove(report_path)  # a stale report from an earlier save would describe another model
    return plan


# Ordinary tensors even when called under torch.inference_mode: inference tensors have no
# version counter, so the fused kernels could not cache the loaded factors' packed form.
@torch.inference_mode(False)
def load(directory, model=None, *, device="cpu"):
    """Rebuilds a model saved by save(): FactorizedConv2d layers are recreated from the plan.

    model: a freshly constructed instance of the same (dense) architecture; by
    default it is built from the plan's model reference. Tensors are loaded
    strictly onto `device`, keeping their saved dtypes. Raises SaveFileError for
    missing, corrupt or mismatched files.
    """
    plan = read_plan(directory)
    weights_path = os.path.join(directory, plan.get("weights", WEIGHTS_FILE))
    state = _read_weights(weights_path, plan, device)
    if model is None:
        ref = plan.get("model")
        if not ref:
            raise SaveFileError("%s records no model reference; pass the architecture: load(dir, model=...)"
                                % os.path.join(directory, PLAN_FILE))
        try:
            model = models.build(ref)
        except ValueError as exc:
            raise SaveFileError("cannot rebuild the saved model: %s" % exc) from None
    elif not isinstance(model, nn.Module):
        raise TypeError("model must be an nn.Module, got %s" % type(model).__name__)
    for fold in plan.get("bn_folds", ()):
        _refold(model, fold["bn"], fold["conv"])
    for i, layer in enumerate(plan["layers"]):
        _rebuild_layer(model, layer, i)
    _load_state(model, state, weights_path)
    if plan.get("model") and models.ref_of(model) is None:
        setattr(model, models.REF_ATTR, plan["model"])
    return model


def read_plan(directory):
    """The parsed and checked hsv_plan.json of a save directory."""
    if not os.path.isdir(directory):
        raise SaveFileError("%s is not a directory (expected one written by hsvkernels.io.save)" % directory)
    path = os.path.join(directory, PLAN_FILE)
    if not os.path.exists(path):
        raise SaveFileError("%s not found: %s is not an hsvkernels save directory" % (path, directory))
    try:
        with open(path) as f:
            plan = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaveFileError("%s is corrupt or truncated (not valid JSON: %s)" % (path, exc)) from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise SaveFileError("%s is not an hsvkernels plan (format field is %r, expected %r)"
                            % (path, plan.get("format") if isinstance(plan, dict) else None, FORMAT))
    version = plan.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SaveFileError("%s has format_version %r; this hsvkernels reads up to %d (upgrade hsvkernels)"
                            % (path, version, FORMAT_VERSION))
    if not isinstance(plan.get("layers"), list):
        raise SaveFileError("%s has no 'layers' list" % path)
    for i, layer in enumerate(plan["layers"]):
        missing = [k for k in _LAYER_KEYS if not isinstance(layer, dict) or k not in layer]
        if missing:
            raise SaveFileError("%s: layers[%d] lacks %s" % (path, i, ", ".join(missing)))
    folds = plan.get("bn_folds", [])
    if not isinstance(folds, list) or not all(isinstance(f, dict) and isinstance(f.get("bn"), str)
                                              and isinstance(f.get("conv"), str) for f in folds):
        raise SaveFileError("%s: bn_folds must be a list of {\"bn\": name, \"conv\": name}" % path)
    return plan


def load_report(directory):
    """The Report saved next to the model, or None if there is none."""
    path = os.path.join(directory, REPORT_FILE)
    if not os.path.exists(path):
        return None
    try:
        return Report.from_json(path)
    except (ValueError, TypeError) as exc:
        raise SaveFileError("%s is corrupt: %s" % (path, exc)) from None


# Plan entries -------------------------------------------------------------------------------

_LAYER_KEYS = ("name", "kind", "meta", "in_channels", "out_channels", "kernel_size", "stride", "padding",
               "dilation", "padding_mode", "bias", "factor_shapes", "dtype")


def _layer_plan(name, m):
    return {
        "name": name,
        "kind": m.kind,
        "meta": m.meta,
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "dilation": m.dilation,
        "padding_mode": m.padding_mode,
        "bias": m.bias is not None,
        "factor_shapes": [tuple(f.shape) for f in m.factors],
        "dtype": str(m.factors[0].dtype).replace("torch.", ""),
    }


def _refold(model, bn_name, conv_name):
    """Puts a fresh model in the folded shape: the BN becomes an identity, its conv gets a bias."""
    try:
        bn, conv = model.get_submodule(bn_name), model.get_submodule(conv_name)
    except AttributeError:
        raise SaveFileError("plan folds BatchNorm %r into conv %r, but the model has no such modules: wrong "
                            "architecture for this save?" % (bn_name, conv_name)) from None
    if not isinstance(bn, nn.BatchNorm2d) or not isinstance(conv, nn.Conv2d):
        raise SaveFileError("plan folds %r into %r, but they are a %s and a %s in the model (expected BatchNorm2d "
                            "and Conv2d)" % (bn_name, conv_name, type(bn).__name__, type(conv).__name__))
    if conv.bias is None:
        w = conv.weight
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=w.dtype, device=w.device),
                                 requires_grad=w.requires_grad)
    identity = FoldedBatchNorm(conv_name)
    identity.train(bn.training)
    replace_module(model, bn, identity)


def _rebuild_layer(model, layer, index):
    """Replaces the nn.Conv2d at layer['name'] with a FactorizedConv2d of the planned shapes."""
    try:
        _rebuild_checked(model, layer, index)
    except SaveFileError:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:   # an edited plan: wrong types or shapes
        raise SaveFileError("plan layer %r (layers[%d]) is malformed: %s: %s"
                            % (layer.get("name"), index, type(exc).__name__, exc)) from None


def _rebuild_checked(model, layer, index):
    name = layer["name"]
    try:
        conv = model.get_submodule(name)
    except AttributeError:
        raise SaveFileError("plan layer %r does not exist in %s: wrong architecture for this save?"
                            % (name, type(model).__name__)) from None
    if not isinstance(conv, nn.Conv2d):
        raise SaveFileError("plan layer %r is a %s in the model, expected nn.Conv2d to replace"
                            % (name, type(conv).__name__))
    planned = {"in_channels": layer["in_channels"], "out_channels": layer["out_channels"],
               "kernel_size": tuple(layer["kernel_size"]), "stride": tuple(layer["stride"]),
               "dilation": tuple(layer["dilation"]), "padding_mode": layer["padding_mode"],
               "bias": bool(layer["bias"]), "groups": 1,
               "padding": layer["padding"] if isinstance(layer["padding"], str) else tuple(layer["padding"])}
    actual = {"in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": conv.kernel_size,
              "stride": conv.stride, "dilation": conv.dilation, "padding_mode": conv.padding_mode,
              "bias": conv.bias is not None, "groups": conv.groups, "padding": conv.padding}
    diff = ["%s: plan %r, model %r" % (k, planned[k], actual[k]) for k in planned if planned[k] != actual[k]]
    if diff:
        raise SaveFileError("plan layer %r does not match the model's conv (%s): wrong architecture for this save?"
                            % (name, "; ".join(diff)))
    dtype = getattr(torch, layer["dtype"], None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SaveFileError("plan layer %r has dtype %r; expected a floating-point torch dtype name"
                            % (name, layer["dtype"]))
    device = conv.weight.device
    factors = [torch.empty(tuple(s), dtype=dtype, device=device) for s in layer["factor_shapes"]]
    try:
        fact = Factorization(layer["kind"], factors, (conv.out_channels, conv.in_channels, *conv.kernel_size),
                             dict(layer["meta"]))
    except (ValueError, TypeError) as exc:
        raise SaveFileError("plan layer %r (layers[%d]) cannot be rebuilt: %s" % (name, index, exc)) from None
    bias = torch.empty(conv.out_channels, dtype=dtype, device=device) if layer["bias"] else None
    new = FactorizedConv2d(fact, conv.stride, conv.padding, conv.dilation, bias, conv.padding_mode)
    new.train(conv.training)
    replace_module(model, conv, new)


# Weights ------------------------------------------------------------------------------------

def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_weights(path, plan, device):
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise SaveFileError("weights file %s not found" % path)
    expected = plan.get("weights_sha256")
    if expected and _sha256(path) != expected:
        raise SaveFileError("%s does not match its plan (checksum differs): the file is corrupt, truncated, "
                            "or from another save" % path)
    try:
        state = load_file(path, device=str(device))
        with safe_open(path, framework="pt") as f:
            aliases = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise SaveFileError("%s is corrupt or truncated: %s" % (path, exc)) from None
    # load_file's CPU tensors point into the file's bytes at the offsets the file has, so their data is not
    # 64-byte aligned (40 mod 64 for a VGG-16 save). BLAS then takes another code path for them: on an AVX2
    # EPYC, MKL gave a loaded Linear layer results 1 ulp away from the same weights in torch's own (aligned)
    # memory. A copy into fresh tensors makes a loaded model compute exactly what the saved one did. Tensors
    # loaded onto a GPU are already fresh allocations, so only CPU ones are copied.
    state = {k: v.clone() if v.device.type == "cpu" else v for k, v in state.items()}
    # save_model dropped tensors sharing storage and recorded "dropped name -> kept name".
    for dropped, kept in aliases.items():
        if kept in state and dropped not in state:
            state[dropped] = state[kept]
    return state


def _load_state(model, state, path):
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = ["%s: file %s, model %s" % (k, tuple(state[k].shape), tuple(v.shape))
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing from the file", missing), ("not in the model", unexpected),
                             ("shape mismatch", shapes)):
            if items:
                parts.append("%s: %s%s" % (label, ", ".join(items[:5]), " (+%d more)" % (len(items) - 5)
                                           if len(items) > 5 else ""))
        raise SaveFileError("%s does not fit the model (%s): %s" % (path, type(model).__name__, "; ".join(parts)))
    # assign=True keeps the saved dtypes instead of casting into the fresh model's.
    model.load_state_dict(with_module_versions(state, expected), strict=True, assign=True)


def with_module_versions(state, model_state):
    """`state` carrying the per-module state_dict versions of `model_state` (the model's own state_dict()),
    where it has none.

    safetensors files hold tensors only, so a dict read from one lacks torch's `_metadata`, and modules
    whose `_load_from_state_dict` checks its version (torchvision's MNASNet) refuse to load. The tensors
    were saved by this architecture's current code, so its current versions are the right ones.
    """
    if getattr(state, "_metadata", None) is not None:
        return state
    versions = getattr(model_state, "_metadata", None)
    if versions is None:
        return state
    state = collections.OrderedDict(state)
    state._metadata = versions
    return state
