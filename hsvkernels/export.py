"""Exporting converted models as graphs of standard ops: torch.export and ONNX.

Deployment runtimes (onnxruntime, TensorRT, ExecuTorch) know nothing of hsv::conv2d. Every call of
it is a chain of ordinary convolutions and reshapes, the reference path, so export replaces each
call by that chain: the exported graph runs wherever F.conv2d runs and computes what the model
computes, with the factors (not the dense weights) as its constants. What is lost is only the fused
kernel; the runtime runs the chain with its own convolutions.
"""
import importlib.util
import inspect

import torch

from . import reference

# Only the forward op: exported inference graphs never hold hsv::conv2d_backward.
HSV_OPS = ("conv2d",)


def hsv_ops_in(program):
    """Names of the hsv ops still called in an ExportedProgram's graph (e.g. ['hsv.conv2d.default'])."""
    return sorted({str(node.target) for node in program.graph.nodes
                   if node.op == "call_function" and str(node.target).startswith("hsv.")})


def decompose_hsv_ops(program):
    """Returns `program` (a torch.export.ExportedProgram) with each hsv::conv2d replaced by its chain
    of aten convolutions and views. Other ops are left as they are (call run_decompositions() on the
    result to lower them further)."""
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError("program must be a torch.export.ExportedProgram, got %s" % type(program).__name__)
    table = {getattr(torch.ops.hsv, name).default: _REFERENCE[name] for name in HSV_OPS}
    return program.run_decompositions(table)


# Without _C the op is itself this chain (CompositeImplicitAutograd) and export inlines it anyway.
_REFERENCE = {"conv2d": reference.conv2d_factors}


def export(model, args, kwargs=None, *, dynamic_batch=False, strict=False):
    """torch.export.export(model, args, kwargs) with the hsv ops expanded into standard aten ops.

    dynamic_batch: dimension 0 of every tensor in args/kwargs becomes one symbolic size, so the
    program takes any batch (examples of batch 0 or 1 are traced at batch 2: torch.export fixes
    sizes 0 and 1). Call model.eval() first for an inference graph (BatchNorm, Dropout).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError("model must be an nn.Module, got %s" % type(model).__name__)
    args = _as_args(args)
    kwargs = dict(kwargs or {})
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = _batch_shapes(model, args, kwargs)
        args, kwargs = _batch_of_two(args), dict(zip(kwargs, _batch_of_two(kwargs.values())))
    program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    return decompose_hsv_ops(program) if hsv_ops_in(program) else program


def to_onnx(model, args, path=None, *, kwargs=None, dynamic_batch=True, opset_version=None, optimize=True):
    """Exports `model` to ONNX with standard ops only (torch.onnx's dynamo exporter).

    Returns the torch.onnx.ONNXProgram (callable through onnxruntime when it is installed) and
    writes it to `path` when given. dynamic_batch (default True) leaves the batch size free.
    Needs the packages onnx and onnxscript (pip install "hsvkernels[onnx]").
    """
    _require("onnx", "onnxscript")
    program = export(model, args, kwargs, dynamic_batch=dynamic_batch)
    onnx_program = torch.onnx.export(program, _as_args(args), kwargs=kwargs, dynamo=True, opset_version=opset_version,
                                     optimize=optimize, verbose=False)
    if path is not None:
        onnx_program.save(str(path))
    return onnx_program


def compare_onnx(path, model, args):
    """Runs the ONNX file at `path` in onnxruntime (CPU) on `args` and `model` in torch; returns
    {"max_abs": ..., "max_rel": ...} over the outputs (max_rel relative to each output's largest value)."""
    _require("onnxruntime")
    import onnxruntime

    args = _as_args(args)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if len(names) != len(tensors):
        raise ValueError("the ONNX file takes %d inputs, args has %d tensors" % (len(names), len(tensors)))
    got = session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)})
    with torch.no_grad():
        want = model(*args)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    if len(got) != len(want):
        raise ValueError("the ONNX file gives %d outputs, the model %d" % (len(got), len(want)))
    max_abs = max_rel = 0.0
    for g, w in zip(got, want):
        w = w.detach().float().cpu()
        diff = (torch.from_numpy(g).float() - w).abs().max().item() if w.numel() else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(w.abs().max().item(), 1e-30) if w.numel() else 0.0)
    return {"max_abs": max_abs, "max_rel": max_rel}


def _as_args(args):
    if isinstance(args, torch.Tensor):
        return (args,)
    if not isinstance(args, (tuple, list)):
        raise TypeError("args must be a tensor or a tuple of the model's positional inputs, got %s"
                        % type(args).__name__)
    return tuple(args)


def _batch_shapes(model, args, kwargs):
    batch = torch.export.Dim("batch")

    def spec(a):
        return {0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None

    if not any(spec(a) for a in (*args, *kwargs.values())):
        raise ValueError("dynamic_batch needs a tensor input with a batch dimension")
    if not kwargs:
        return tuple(spec(a) for a in args)
    # With keyword inputs torch.export wants the specs keyed by forward's parameter names.
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: spec(value) for name, value in bound.arguments.items()}


def _batch_of_two(values):
    out = []
    for a in values:
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] < 2:
            channels_last = a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) \
                and not a.is_contiguous()
            row = a if a.shape[0] == 1 else a.new_zeros((1,) + tuple(a.shape[1:]))
            a = torch.cat([row, row]).contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        out.append(a)
    return tuple(out)


def missing_packages(*packages):
    """The names among `packages` that cannot be imported here."""
    return [p for p in packages if importlib.util.find_spec(p) is None]


def missing_message(missing):
    return ("ONNX export needs the package(s) %s: pip install %s (or pip install \"hsvkernels[onnx]\")"
            % (", ".join(missing), " ".join(missing)))


def _require(*packages):
    missing = missing_packages(*packages)
    if missing:
        raise ImportError(missing_message(missing))
