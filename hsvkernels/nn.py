"""FactorizedConv2d: an nn.Conv2d whose kernel is stored as factors and run by hsv::conv2d."""
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from ._args import pair
from .decompose import METHODS, decompose
from .factorization import Factorization
from .ops import call_conv2d

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _method_parameters(method):
    fn = METHODS.get(method)
    return inspect.signature(fn).parameters if fn is not None else {}


class FactorizedConv2d(nn.Module):
    """A 2-D convolution with a factorized kernel.

    It keeps nn.Conv2d's attributes (in_channels, out_channels, kernel_size, stride,
    padding, dilation, groups, padding_mode, bias) so code that inspects convs keeps
    working. Build one with `FactorizedConv2d.from_conv(conv, method=..., ratio=...)`.
    """

    def __init__(self, fact, stride=1, padding=0, dilation=1, bias=None, padding_mode="zeros"):
        super().__init__()
        if not isinstance(fact, Factorization):
            raise TypeError("fact must be a hsvkernels.Factorization, got %s" % type(fact).__name__)
        self.kind = fact.kind
        self.meta = dict(fact.meta)
        self.out_channels, self.in_channels, kh, kw = fact.shape
        self.kernel_size = (kh, kw)
        self.stride = pair(stride, "stride")
        self.dilation = pair(dilation, "dilation")
        for name, value in (("stride", self.stride), ("dilation", self.dilation)):
            if min(value) < 1:
                raise ValueError("%s must be >= 1, got %s" % (name, value))
        self.groups = 1
        if padding_mode not in PADDING_MODES:
            raise ValueError("padding_mode must be one of %s, got %r" % (PADDING_MODES, padding_mode))
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError("padding must be 'same', 'valid', an int or a pair, got %r" % padding)
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (stride=%s)"
                                 % (self.stride,))
            self.padding = padding
        else:
            self.padding = pair(padding, "padding")
            if min(self.padding) < 0:
                raise ValueError("padding must be >= 0, got %s" % (self.padding,))
        # Ordinary tensors even when built under torch.inference_mode (a model converted or loaded
        # there): the fused kernels cache packed factors by version counter, which inference
        # tensors lack, so such factors would be repacked on every call (ResNet-18: 13% slower).
        with torch.inference_mode(False):
            self.factors = nn.ParameterList([nn.Parameter(f.detach().clone()) for f in fact.factors])
            if bias is not None:
                bias = torch.as_tensor(bias)
                if bias.shape != (self.out_channels,):
                    raise ValueError("bias must have shape (%d,), got %s" % (self.out_channels, tuple(bias.shape)))
                self.bias = nn.Parameter(bias.detach().clone())
            else:
                self.register_parameter("bias", None)
        self._explicit_pad, self._op_padding = self._padding_plan()

    @classmethod
    def from_conv(cls, conv, method="svd", *, rank=None, ratio=None, **options):
        """Factorizes an nn.Conv2d's weight; stride, padding, dilation, bias and padding_mode carry over."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError("from_conv expects an nn.Conv2d, got %s" % type(conv).__name__)
        if conv.groups != 1:
            raise ValueError("FactorizedConv2d cannot represent a grouped convolution (groups=%d): "
                             "its factors span all input channels" % conv.groups)
        if "stride" in _method_parameters(method) and "stride" not in options:
            # Methods whose early stages run at the input resolution need the stride to keep
            # their MAC accounting (and the "never costlier than dense" guard) right.
            options["stride"] = conv.stride
        fact = decompose(conv.weight.detach(), method, rank=rank, ratio=ratio, **options)
        bias = None if conv.bias is None else conv.bias.detach()
        return cls(fact, conv.stride, conv.padding, conv.dilation, bias, conv.padding_mode)

    def _padding_plan(self):
        """(explicit F.pad amounts or None, symmetric padding for the op).

        Zero padding that is symmetric goes to the op. Asymmetric 'same' padding and
        the non-zero padding modes are applied to the input first, as nn.Conv2d does.
        """
        if self.padding == "valid":
            per_dim = [(0, 0), (0, 0)]
        elif self.padding == "same":
            per_dim = []
            for d in range(2):
                total = self.dilation[d] * (self.kernel_size[d] - 1)
                per_dim.append((total // 2, total - total // 2))
        else:
            per_dim = [(p, p) for p in self.padding]
        symmetric = all(lo == hi for lo, hi in per_dim)
        if self.padding_mode == "zeros" and symmetric:
            return None, (per_dim[0][0], per_dim[1][0])
        # F.pad takes the last dimension first: (w_lo, w_hi, h_lo, h_hi).
        return (per_dim[1][0], per_dim[1][1], per_dim[0][0], per_dim[0][1]), (0, 0)

    def _apply(self, fn, recurse=True):
        # Module.to(memory_format=torch.channels_last) converts every 4-D and 5-D tensor and refuses
        # the 5-D ones (hsv's B), so a converted model could not take the format like any CNN. A 5-D
        # tensor that fn refuses goes through a 4-D view of itself instead (its first two dims merged);
        # every other conversion sees the factors as they are. If the view is refused too, the
        # original error stands.
        def fn_5d(t):
            try:
                return fn(t)
            except RuntimeError as exc:
                if t.dim() != 5:
                    raise
                try:
                    return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2])
                except RuntimeError:
                    raise exc from None

        return super()._apply(fn_5d, recurse)

    @property
    def factorization(self):
        return Factorization(self.kind, list(self.factors), (self.out_channels, self.in_channels, *self.kernel_size),
                             dict(self.meta))

    @property
    def weight(self):
        """The dense kernel the factors represent (computed on access)."""
        return self.factorization.to_dense()

    def forward(self, input):
        if input.dim() == 3:   # unbatched (C, H, W), which nn.Conv2d takes too
            return self.forward(input.unsqueeze(0)).squeeze(0)
        if self._explicit_pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            input = F.pad(input, self._explicit_pad, mode=mode)
        return call_conv2d(input, self._factor_list(), self.bias, self.stride, self._op_padding, self.dilation, 1,
                           self.kind)

    def _factor_list(self):
        # ParameterList's iterator looks each entry up by name (4.5 us for 2 factors); its
        # _parameters dict holds the same tensors in order (ParameterList stores every tensor there).
        params = self.factors._parameters
        return list(params.values()) if len(params) == len(self.factors) else list(self.factors)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def macs(self, out_h, out_w, in_h=None, in_w=None):
        return self.factorization.macs(out_h, out_w, in_h, in_w)

    def to_dense(self):
        """An nn.Conv2d computing the same function, on the same device and dtype."""
        first = self.factors[0]
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, 1, self.bias is not None, self.padding_mode,
                         device=first.device, dtype=first.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self):
        s = "%d, %d, kernel_size=%s, stride=%s, padding=%s, kind=%s" % (
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.kind)
        if self.dilation != (1, 1):
            s += ", dilation=%s" % (self.dilation,)
        if self.padding_mode != "zeros":
            s += ", padding_mode=%s" % self.padding_mode
        if self.bias is None:
            s += ", bias=False"
        ranks = {k: v for k, v in self.meta.items() if "rank" in k}
        if ranks:
            s += ", " + ", ".join("%s=%s" % kv for kv in ranks.items())
        ratio = math.prod((self.out_channels, self.in_channels, *self.kernel_size)) / sum(
            f.numel() for f in self.factors)
        return s + ", compression=%.2fx" % ratio
