"""torch.ops.hsv.*: the Python wrapper and the torch.library registrations.

The schemas and the CPU/CUDA kernels come from the C++ extension. Here we add
what torch.library wants from Python: fake (meta) kernels for torch.compile and
export, autograd, and FLOP formulas. Without the extension the same schemas are
defined here on top of the reference path, so callers never see the difference.
"""
import warnings

import torch
from torch.utils.flop_counter import register_flop_formula

from . import formats, reference
from ._args import pair
from ._extension import HAS_EXTENSION

CONV2D_SCHEMA = ("conv2d(Tensor input, Tensor[] factors, Tensor? bias, int[2] stride, int[2] padding, "
                 "int[2] dilation, int groups, str kind) -> Tensor")
CONV2D_BACKWARD_SCHEMA = ("conv2d_backward(Tensor grad_output, Tensor input, Tensor[] factors, bool has_bias, "
                          "int[2] stride, int[2] padding, int[2] dilation, int groups, str kind, "
                          "bool[3] output_mask) -> (Tensor, Tensor[], Tensor)")
CONV2D_EPILOGUE_SCHEMA = ("conv2d_epilogue(Tensor input, Tensor[] factors, Tensor? bias, Tensor? residual, "
                          "int[2] stride, int[2] padding, int[2] dilation, int groups, str kind, bool relu) -> Tensor")


def _reference_backward(grad_output, input, factors, has_bias, stride, padding, dilation, groups, kind, output_mask):
    """conv2d_backward by autograd through the reference chain (used without _C)."""
    fmt, _, _ = formats.check_call(input, factors, None, stride, padding, dilation, groups, kind)
    with torch.enable_grad():
        x = input.detach().requires_grad_(bool(output_mask[0]))
        fs = [f.detach().requires_grad_(bool(output_mask[1])) for f in factors]
        y = fmt.chain(x, fs, pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation"))
        wanted = ([x] if output_mask[0] else []) + (fs if output_mask[1] else [])
        grads = list(torch.autograd.grad(y, wanted, grad_output, allow_unused=True)) if wanted else []
    grad_input = grads.pop(0) if output_mask[0] else None
    grad_factors = [g if g is not None else torch.zeros_like(f) for g, f in zip(grads, factors)]
    grad_bias = grad_output.sum((0, 2, 3)) if has_bias and output_mask[2] else None
    return grad_input, grad_factors, grad_bias


# Fake kernels -------------------------------------------------------------------------

def _conv2d_fake(input, factors, bias, stride, padding, dilation, groups, kind):
    _, shape, (ho, wo) = formats.check_call(input, factors, bias, stride, padding, dilation, groups, kind)
    out = input.new_empty((input.shape[0], shape.out_channels, ho, wo))
    return out.contiguous(memory_format=formats.memory_format_of_output(input))


def _conv2d_backward_fake(grad_output, input, factors, has_bias, stride, padding, dilation, groups, kind,
                          output_mask):
    _, shape, _ = formats.check_call(input, factors, None, stride, padding, dilation, groups, kind)
    grad_input = None
    if output_mask[0]:
        grad_input = torch.empty_like(input, memory_format=formats.memory_format_of_output(input))
    grad_factors = [f.new_empty(f.shape) for f in factors] if output_mask[1] else []
    grad_bias = input.new_empty((shape.out_channels,)) if has_bias and output_mask[2] else None
    return grad_input, grad_factors, grad_bias


def _conv2d_epilogue_fake(input, factors, bias, residual, stride, padding, dilation, groups, kind, relu):
    out = _conv2d_fake(input, factors, bias, stride, padding, dilation, groups, kind)
    if residual is not None:
        formats.check_residual(residual, out.shape, out.dtype, out.device)
    return out


# Autograd -----------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    input, factors, bias, stride, padding, dilation, groups, kind = inputs
    ctx.save_for_backward(input, *factors)
    ctx.has_bias = bias is not None
    ctx.conv = (stride, padding, dilation, groups, kind)


def _conv_grads(grad_output, input, factors, has_bias, conv, need_input, need_factors, need_bias):
    """(grad_input, [grad per factor], grad_bias) of hsv::conv2d, None where not needed."""
    mask = [bool(need_input), any(need_factors), bool(need_bias) and has_bias]
    grad_input, grad_factors, grad_bias = None, [None] * len(factors), None
    if any(mask):
        stride, padding, dilation, groups, kind = conv
        gi, gf, gb = torch.ops.hsv.conv2d_backward(grad_output, input, factors, has_bias, stride, padding,
                                                   dilation, groups, kind, mask)
        grad_input = gi if mask[0] else None
        if mask[1]:
            grad_factors = [g if need else None for g, need in zip(gf, need_factors)]
        grad_bias = gb if mask[2] else None
    return grad_input, grad_factors, grad_bias


def _backward(ctx, grad_output):
    input, *factors = ctx.saved_tensors
    grads = _conv_grads(grad_output, input, factors, ctx.has_bias, ctx.conv, *ctx.needs_input_grad[:3])
    return (*grads, None, None, None, None, None)


def _epilogue_setup_context(ctx, inputs, output):
    input, factors, bias, residual, stride, padding, dilation, groups, kind, relu = inputs
    # ReLU's gradient needs only where the output is positive, so the output is saved, not the sum before it.
    ctx.save_for_backward(input, output if relu else None, *factors)
    ctx.has_bias, ctx.relu = bias is not None, relu
    ctx.conv = (stride, padding, dilation, groups, kind)


def _epilogue_backward(ctx, grad_output):
    input, output, *factors = ctx.saved_tensors
    grad = torch.ops.aten.threshold_backward(grad_output, output, 0) if ctx.relu else grad_output
    need = ctx.needs_input_grad
    grads = _conv_grads(grad, input, factors, ctx.has_bias, ctx.conv, *need[:3])
    return (*grads, grad if need[3] else None, None, None, None, None, None, None)


# FLOP formulas (2 FLOPs per multiply-accumulate, bias adds not counted, like aten.convolution) --

def _stage_macs(input_shape, factor_shapes, kind, out_hw):
    fmt = formats.get(kind)
    return fmt.stage_macs([tuple(s) for s in factor_shapes], tuple(input_shape[2:]), tuple(out_hw))


def _conv2d_flops(input_shape, factor_shapes, bias_shape, stride, padding, dilation, groups, kind, *,
                  out_shape=None, **kwargs):
    return 2 * input_shape[0] * sum(_stage_macs(input_shape, factor_shapes, kind, out_shape[2:]))


def _conv2d_backward_flops(grad_shape, input_shape, factor_shapes, has_bias, stride, padding, dilation, groups,
                           kind, output_mask, *, out_shape=None, **kwargs):
    # Each stage's weight gradient costs its forward MACs, and so does each stage's
    # input gradient except the first one's when the input gradient is not wanted.
    macs = _stage_macs(input_shape, factor_shapes, kind, grad_shape[2:])
    total = (sum(macs) if output_mask[1] else 0) + sum(macs[1:]) + (macs[0] if output_mask[0] else 0)
    if not (output_mask[0] or output_mask[1]):
        total = 0
    return 2 * input_shape[0] * total


def _conv2d_epilogue_flops(input_shape, factor_shapes, bias_shape, residual_shape, stride, padding, dilation,
                           groups, kind, relu, *, out_shape=None, **kwargs):
    return _conv2d_flops(input_shape, factor_shapes, bias_shape, stride, padding, dilation, groups, kind,
                         out_shape=out_shape)


# Autocast: like aten.conv2d, the op runs in the autocast dtype ------------------------

def _register_autocast(lib, device_type, dispatch_key):
    def cast(t):
        if t is not None and t.is_floating_point() and t.device.type == device_type:
            return t.to(torch.get_autocast_dtype(device_type))
        return t

    # Disabling autocast excludes its dispatch key, so these calls reach the real kernels.
    def conv2d(input, factors, bias, stride, padding, dilation, groups, kind):
        with torch.autocast(device_type, enabled=False):
            return torch.ops.hsv.conv2d(cast(input), [cast(f) for f in factors], cast(bias), stride, padding,
                                        dilation, groups, kind)

    def conv2d_epilogue(input, factors, bias, residual, stride, padding, dilation, groups, kind, relu):
        with torch.autocast(device_type, enabled=False):
            return torch.ops.hsv.conv2d_epilogue(cast(input), [cast(f) for f in factors], cast(bias), cast(residual),
                                                 stride, padding, dilation, groups, kind, relu)

    lib.impl("conv2d", conv2d, dispatch_key)
    lib.impl("conv2d_epilogue", conv2d_epilogue, dispatch_key)


# The public wrapper --------------------------------------------------------------------

# torch.library's autograd kernel is Python: with grad mode off (torch.no_grad) it only
# redispatches below autograd, and the trip through it cost ~11 us per call (2-core EPYC,
# a 16-channel conv on a 2x2 image: 25 us against 14 here), ~5% of a compressed
# ResNet-18 at batch 1. Under inference_mode the autograd keys are excluded already.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None) if HAS_EXTENSION else None


# The fused kernels cache each factor's packed form until its version counter moves; an
# inference tensor (made under torch.inference_mode, e.g. by model.to() there) has none, so it
# is repacked on every call: 13% of a compressed ResNet-18's time at batch 1 (2-core EPYC).
# FactorizedConv2d makes its own parameters ordinary tensors; this catches the rest, once.
_inference_factors_warned = False

INFERENCE_FACTORS_WARNING = (
    "hsv::conv2d got factors that are inference tensors (made under torch.inference_mode, e.g. by model.to() "
    "there). They have no version counter, so the fused kernels cannot cache their packed form and repack them on "
    "every call. Build, load and move the model outside torch.inference_mode() and only run it inside.")


def _warn_inference_factors():
    global _inference_factors_warned
    _inference_factors_warned = True
    warnings.warn(INFERENCE_FACTORS_WARNING, stacklevel=4)


def _below_autograd(factors):
    """Whether a call may skip the autograd kernel: grad mode off, and not while torch.compile traces
    (it traces the op itself)."""
    if _BELOW_AUTOGRAD is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if not _inference_factors_warned and factors and factors[0].is_inference():
        _warn_inference_factors()
    return True


def call_conv2d(input, factors, bias, stride, padding, dilation, groups, kind):
    """torch.ops.hsv.conv2d, past the autograd kernel when grad mode is off."""
    if not _below_autograd(factors):
        return torch.ops.hsv.conv2d(input, factors, bias, stride, padding, dilation, groups, kind)
    with _BELOW_AUTOGRAD():
        return torch.ops.hsv.conv2d(input, factors, bias, stride, padding, dilation, groups, kind)


def call_conv2d_epilogue(input, factors, bias, residual, stride, padding, dilation, groups, kind, relu):
    """torch.ops.hsv.conv2d_epilogue, past the autograd kernel when grad mode is off."""
    if not _below_autograd(factors):
        return torch.ops.hsv.conv2d_epilogue(input, factors, bias, residual, stride, padding, dilation, groups,
                                             kind, relu)
    with _BELOW_AUTOGRAD():
        return torch.ops.hsv.conv2d_epilogue(input, factors, bias, residual, stride, padding, dilation, groups,
                                             kind, relu)


def conv2d(input, fact, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Factorized 2-D convolution: F.conv2d(input, fact.to_dense(), bias, ...) computed from the factors.

    fact: a Factorization (from hsvkernels.decompose). stride, padding and dilation
    are ints or pairs, as in torch.nn.functional.conv2d; padding is numeric.
    """
    if not hasattr(fact, "factors") or not hasattr(fact, "kind"):
        raise TypeError("fact must be a hsvkernels.Factorization, got %s" % type(fact).__name__)
    return call_conv2d(input, list(fact.factors), bias, pair(stride, "stride"), pair(padding, "padding"),
                       pair(dilation, "dilation"), groups, fact.kind)


# Registration ------------------------------------------------------------------------

if HAS_EXTENSION:
    torch.library.register_fake("hsv::conv2d", _conv2d_fake)
    torch.library.register_fake("hsv::conv2d_backward", _conv2d_backward_fake)
    torch.library.register_fake("hsv::conv2d_epilogue", _conv2d_epilogue_fake)
    torch.library.register_autograd("hsv::conv2d", _backward, setup_context=_setup_context)
    torch.library.register_autograd("hsv::conv2d_epilogue", _epilogue_backward,
                                    setup_context=_epilogue_setup_context)
    _autocast_lib = torch.library.Library("hsv", "IMPL")
    _register_autocast(_autocast_lib, "cpu", "AutocastCPU")
    _register_autocast(_autocast_lib, "cuda", "AutocastCUDA")
    register_flop_formula(torch.ops.hsv.conv2d)(_conv2d_flops)
    register_flop_formula(torch.ops.hsv.conv2d_backward)(_conv2d_backward_flops)
    register_flop_formula(torch.ops.hsv.conv2d_epilogue)(_conv2d_epilogue_flops)
else:
    # Without _C the ops are the reference chain itself (CompositeImplicitAutograd):
    # autograd, fake tensors, autocast and FLOP counting then come from the aten
    # convs they decompose into, and the backward op runs above autograd.
    _fallback_lib = torch.library.Library("hsv", "DEF")
    _fallback_lib.define(CONV2D_SCHEMA)
    _fallback_lib.define(CONV2D_BACKWARD_SCHEMA)
    _fallback_lib.define(CONV2D_EPILOGUE_SCHEMA)
    _fallback_lib.impl("conv2d", reference.conv2d_factors, "CompositeImplicitAutograd")
    _fallback_lib.impl("conv2d_backward", _reference_backward, "CompositeImplicitAutograd")
    _fallback_lib.impl("conv2d_epilogue", reference.conv2d_epilogue, "CompositeImplicitAutograd")
