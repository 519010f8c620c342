"""Exporting converted models as graphs of standard ops: torch.export and ONNX.

Deployment runtimes (onnxruntime, TensorRT, ExecuTorch) know nothing of hsv::conv2d. Every call of
it is a chain of ordinary convolutions and reshapes, the reference path, so export replaces each
call by that chain: the exported graph runs wherever F.conv2d runs and computes what the model
computes, with the factors (not the dense weights) as its constants. What is lost is only the fused
kernel; the runtime runs the chain with its own convolutions.
"""
import importlib.util
import inspect
import warnings

import torch

from . import _outputs, formats, reference

# hsv op name -> the pure-PyTorch function export puts in its place. Only the forward op: exported
# inference graphs never hold hsv::conv2d_backward. (Without _C the op is itself this chain,
# CompositeImplicitAutograd, and export inlines it anyway.)
DECOMPOSITIONS = {"conv2d": reference.conv2d_factors, "conv2d_epilogue": reference.conv2d_epilogue}


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
    return program.run_decompositions({getattr(torch.ops.hsv, name).default: fn
                                       for name, fn in DECOMPOSITIONS.items()})


def export(model, args, kwargs=None, *, dynamic_batch=False, dynamic_size=False, strict=False):
    """torch.export.export(model, args, kwargs) with the hsv ops expanded into standard aten ops.

    dynamic_batch: dimension 0 of every tensor in args/kwargs becomes one symbolic size, so the
    program takes any batch (examples of batch 0 or 1 are traced at batch 2: torch.export fixes
    sizes 0 and 1). dynamic_size: the height and width of every 4-D tensor are left to
    torch.export to make symbolic (Dim.AUTO: free where the model allows). The layout rule of
    hsv::conv2d looks at size-1 dims, so the program keeps the example's answer to "is this
    feature map 1 x 1": sizes that change it fail a guard when run, and an example with 1 x 1
    maps bounds the sizes (a warning says so; trace with a larger example). Call model.eval()
    first for an inference graph (BatchNorm, Dropout).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError("model must be an nn.Module, got %s" % type(model).__name__)
    args = _as_args(args)
    kwargs = dict(kwargs or {})
    dynamic_shapes = None
    if dynamic_batch or dynamic_size:
        dynamic_shapes = _dynamic_shapes(model, args, kwargs, dynamic_batch, dynamic_size)
    if dynamic_batch:
        args, kwargs = _batch_of_two(args), dict(zip(kwargs, _batch_of_two(kwargs.values())))
    program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    if dynamic_size:
        _warn_bounded_sizes(program)
    return decompose_hsv_ops(program) if hsv_ops_in(program) else program


def bounded_input_sizes(program):
    """[(input index, dim, lower, upper)] for input sizes the program accepts only up to a finite bound."""
    bounds = {str(sym): vr for sym, vr in program.range_constraints.items()}
    inputs = [n for n in program.graph.nodes if n.op == "placeholder"
              and n.name in program.graph_signature.user_inputs]
    out = []
    for i, node in enumerate(inputs):
        val = node.meta.get("val")
        for d, size in enumerate(getattr(val, "shape", ())):
            vr = bounds.get(str(size))
            upper = _finite_int(vr.upper) if vr is not None else None
            if upper is not None:
                out.append((i, d, int(vr.lower), upper))
    return out


def _finite_int(value):
    try:   # torch's symbolic infinity (int_oo) refuses int()
        return int(value)
    except (OverflowError, TypeError, ValueError, AttributeError):
        return None


def _warn_bounded_sizes(program):
    # A feature map of 1 x 1 in the example (a small image through a deep net) makes torch.export
    # specialise the layout checks on it, and the program then refuses larger images.
    bounded = bounded_input_sizes(program)
    if bounded:
        warnings.warn("dynamic_size: the exported program accepts only %s; the example input made some feature map "
                      "1 x 1, so trace with a larger example for free sizes"
                      % ", ".join("input %d dim %d in [%d, %d]" % b for b in bounded), stacklevel=3)


def to_onnx(model, args, path=None, *, kwargs=None, dynamic_batch=True, dynamic_size=False, opset_version=None,
            optimize=True):
    """Exports `model` to ONNX with standard ops only (torch.onnx's dynamo exporter).

    Returns the torch.onnx.ONNXProgram (callable through onnxruntime when it is installed) and
    writes it to `path` when given. dynamic_batch (default True) leaves the batch size free,
    dynamic_size the image height and width (as in export()).
    Needs the packages onnx and onnxscript (pip install "hsvkernels[onnx]").
    """
    _require("onnx", "onnxscript")
    program = export(model, args, kwargs, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size)
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
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(t.dtype == torch.bfloat16 for t in tensors):   # numpy has no bfloat16: say so, not fail inside .numpy()
        raise ValueError("compare_onnx: args holds torch.bfloat16 tensors, which numpy and onnxruntime's CPU provider "
                         "do not take; compare a float32 copy of the model and inputs")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise ValueError("the ONNX file takes %d inputs, args has %d tensors" % (len(names), len(tensors)))
    got = session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)})
    with torch.no_grad():
        want = model(*args)
    want = _outputs.leaves(want)   # a dict or tuple output is flattened the way the exporter did
    if len(got) != len(want):
        raise ValueError("the ONNX file gives %d outputs, the model %d" % (len(got), len(want)))
    max_abs = max_rel = 0.0
    for g, w in zip(got, want):
        w = w.detach().float().cpu()
        if not w.numel():
            continue
        diff = (torch.from_numpy(g).float() - w).abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(w.abs().max().item(), 1e-30))
    return {"max_abs": max_abs, "max_rel": max_rel}


def _as_args(args):
    if isinstance(args, torch.Tensor):
        return (args,)
    if not isinstance(args, (tuple, list)):
        raise TypeError("args must be a tensor or a tuple of the model's positional inputs, got %s"
                        % type(args).__name__)
    return tuple(args)


def _dynamic_shapes(model, args, kwargs, batch, size):
    batch_dim = torch.export.Dim("batch") if batch else None

    def spec(a):
        if not isinstance(a, torch.Tensor) or a.dim() == 0:
            return None
        out = {0: batch_dim} if batch else {}
        if size and a.dim() == 4:
            out.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
        return out or None

    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if batch and not any(a.dim() > 0 for a in tensors):
        raise ValueError("dynamic_batch needs a tensor input with a batch dimension")
    if size and not any(a.dim() == 4 for a in tensors):
        raise ValueError("dynamic_size needs a 4-D (N, C, H, W) tensor input")
    if not kwargs:
        return tuple(spec(a) for a in args)
    # With keyword inputs torch.export wants the specs keyed by forward's parameter names.
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: spec(value) for name, value in bound.arguments.items()}


def _batch_of_two(values):
    out = []
    for a in values:
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] < 2:
            # the layout the op would give the example (the traced graph keeps it)
            layout = formats.memory_format_of_output(a) if a.dim() == 4 else torch.contiguous_format
            row = a if a.shape[0] == 1 else a.new_zeros((1,) + tuple(a.shape[1:]))
            a = torch.cat([row, row]).contiguous(memory_format=layout)
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
