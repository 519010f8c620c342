"""The pure-PyTorch reference path: the test oracle, and the fallback without _C.

It runs each kind's factors as a chain of F.conv2d calls (formats/<kind>.py),
independent of the C++ code, and checks its arguments exactly as the op does.
"""
from . import formats
from ._args import pair


def conv2d_factors(input, factors, bias, stride, padding, dilation, groups, kind):
    """Same arguments and result as torch.ops.hsv.conv2d."""
    fmt, _, _ = formats.check_call(input, factors, bias, stride, padding, dilation, groups, kind)
    y = fmt.chain(input, list(factors), pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation"))
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1).to(y.dtype)  # y is in autocast's dtype under autocast, as with _C
    return y.contiguous(memory_format=formats.memory_format_of_output(input))


def conv2d(input, fact, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Same arguments and result as hsvkernels.conv2d."""
    return conv2d_factors(input, fact.factors, bias, stride, padding, dilation, groups, fact.kind)


def conv2d_epilogue(input, factors, bias, residual, stride, padding, dilation, groups, kind, relu):
    """Same arguments and result as torch.ops.hsv.conv2d_epilogue: relu(conv + residual), each part optional."""
    y = conv2d_factors(input, factors, bias, stride, padding, dilation, groups, kind)  # checks its arguments
    if residual is not None:
        formats.check_residual(residual, y.shape, input.dtype, input.device)
        y = y + residual.to(y.dtype)  # y is in autocast's dtype under autocast, like the op's cast residual
    if relu:
        y = y.relu()
    return y.contiguous(memory_format=formats.memory_format_of_output(input))
