"""What every factor format shares: the interface and the checks on a call."""
import math
from dataclasses import dataclass

import torch

from .._args import conv_out_size, pair


@dataclass(frozen=True)
class KernelShape:
    out_channels: int
    in_channels: int
    kh: int
    kw: int


class Format:
    """One kind of factorized conv kernel. Subclasses fill in the layout."""

    kind = None
    factor_names = ()

    def kernel_shape(self, shapes):
        """Checks the factor shapes (a list of sizes) and returns the dense kernel's KernelShape."""
        raise NotImplementedError

    def to_dense(self, factors):
        """The dense (Cout, Cin, kh, kw) kernel the factors represent."""
        raise NotImplementedError

    def chain(self, x, factors, stride, padding, dilation):
        """The factorized conv (no bias) as a chain of plain PyTorch ops."""
        raise NotImplementedError

    def stage_macs(self, shapes, in_hw, out_hw):
        """Multiply-accumulates of each stage, per image, for input/output sizes (H, W)."""
        raise NotImplementedError

    # Shared helpers -----------------------------------------------------------------
    def error(self, message):
        return ValueError("hsv::conv2d(kind='%s'): %s" % (self.kind, message))

    def expect_factor_count(self, shapes):
        if len(shapes) != len(self.factor_names):
            raise self.error("expected %d factors [%s], got %d"
                             % (len(self.factor_names), ", ".join(self.factor_names), len(shapes)))

    def num_params(self, shapes):
        return sum(math.prod(s) for s in shapes)


def as_shape(x, *shape):
    """x viewed as shape; x itself when it already has it. reshape() gives the size-1
    dims of its result fresh strides, and a batch-1 channels_last activation reshaped
    to its own shape no longer looks channels_last to the conv backend, which then
    copies it to NCHW first (the same fix as as_shape in csrc/ops/chain/conv_chain.cpp)."""
    return x if tuple(x.shape) == shape else x.reshape(shape)


def memory_format_of_output(input):
    """The op returns channels_last when its input is channels_last (and not also NCHW-contiguous)."""
    if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def check_call(input, factors, bias, stride, padding, dilation, groups, kind):
    """Validates one hsv::conv2d call as the C++ op does; returns (format, KernelShape, (Ho, Wo))."""
    from . import get  # local import: the registry imports this module

    fmt = get(kind)
    if not isinstance(input, torch.Tensor) or input.dim() != 4:
        got = "%d-D with shape %s" % (input.dim(), tuple(input.shape)) if isinstance(input, torch.Tensor) \
            else type(input).__name__
        raise ValueError("hsv::conv2d: input must be 4-D (N, C, H, W), got %s" % got)
    if not input.is_floating_point():
        raise ValueError("hsv::conv2d: input must be a floating point tensor, got %s" % input.dtype)
    if len(factors) == 0:
        raise ValueError("hsv::conv2d: factors is empty; kind '%s' needs its factor tensors" % kind)
    for i, f in enumerate(factors):
        if f.dtype != input.dtype:
            raise ValueError("hsv::conv2d: factors[%d] has dtype %s but input has dtype %s" % (i, f.dtype, input.dtype))
        if f.device != input.device:
            raise ValueError("hsv::conv2d: factors[%d] is on %s but input is on %s" % (i, f.device, input.device))
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if min(stride) <= 0:
        raise ValueError("hsv::conv2d: stride must be positive, got %s" % (stride,))
    if min(padding) < 0:
        raise ValueError("hsv::conv2d: padding must be non-negative, got %s" % (padding,))
    if min(dilation) <= 0:
        raise ValueError("hsv::conv2d: dilation must be positive, got %s" % (dilation,))
    if groups < 1:
        raise ValueError("hsv::conv2d: groups must be positive, got %d" % groups)
    if input.shape[1] % groups != 0:
        raise ValueError("hsv::conv2d: input channels (%d) are not divisible by groups (%d)" % (input.shape[1], groups))
    if groups != 1:
        raise ValueError("hsv::conv2d: kind '%s' supports groups=1 only, got groups=%d" % (kind, groups))
    shape = fmt.kernel_shape([tuple(f.shape) for f in factors])
    if input.shape[1] != shape.in_channels:
        raise ValueError("hsv::conv2d(kind='%s'): input has %d channels but the factors expect Cin = %d"
                         % (kind, input.shape[1], shape.in_channels))
    out_hw = []
    for d, (name, k) in enumerate((("height", shape.kh), ("width", shape.kw))):
        size = input.shape[2 + d]
        if size == 0:   # as F.conv2d and the op: only the batch may be empty
            raise ValueError("hsv::conv2d: input %s is 0; only the batch dimension may be empty" % name)
        span = dilation[d] * (k - 1) + 1
        if size + 2 * padding[d] < span:
            raise ValueError("hsv::conv2d: input %s = %d with padding %d is smaller than the dilated kernel extent %d"
                             % (name, size, padding[d], span))
        out_hw.append(conv_out_size(size, k, stride[d], padding[d], dilation[d]))
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != shape.out_channels:
            raise ValueError("hsv::conv2d: bias must have shape (%d,) to match the output channels, got %s"
                             % (shape.out_channels, tuple(bias.shape)))
        if bias.dtype != input.dtype:
            raise ValueError("hsv::conv2d: bias has dtype %s but input has dtype %s" % (bias.dtype, input.dtype))
        if bias.device != input.device:
            raise ValueError("hsv::conv2d: bias is on %s but input is on %s" % (bias.device, input.device))
    return fmt, shape, tuple(out_hw)


def check_residual(residual, out_shape, dtype, device):
    """Validates hsv::conv2d_epilogue's residual against the conv output it is added to, as the C++ op does."""
    if not isinstance(residual, torch.Tensor):
        raise TypeError("hsv::conv2d_epilogue: residual must be a tensor or None, got %s" % type(residual).__name__)
    if tuple(residual.shape) != tuple(out_shape):
        raise ValueError("hsv::conv2d_epilogue: residual must have the conv output's shape %s, got %s"
                         % (list(out_shape), list(residual.shape)))
    if residual.dtype != dtype:
        raise ValueError("hsv::conv2d_epilogue: residual has dtype %s but the conv output has dtype %s"
                         % (residual.dtype, dtype))
    if residual.device != device:
        raise ValueError("hsv::conv2d_epilogue: residual is on %s but the conv output is on %s"
                         % (residual.device, device))
