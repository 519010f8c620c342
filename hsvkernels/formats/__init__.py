"""The factor layouts the hsv::conv2d op understands, one module per kind.

A format says what a kind's factors are (names, shapes, checks), how to run them
as a chain of plain PyTorch convs (the reference path), how to rebuild the dense
kernel, and what each stage costs. The C++ kernels implement the same layouts
(csrc/ops/chain/kind_*.cpp); tests hold the two against each other.
"""
from .base import Format, KernelShape, check_call, check_residual, memory_format_of_output
from .cp import CP
from .hsv import HSV
from .ht2 import HT2
from .kcp import KCP
from .svd import SVD
from .tt import TT
from .tt_tucker import TTTucker
from .tucker2 import Tucker2

FORMATS = {f.kind: f for f in (SVD(), HSV(), KCP(), Tucker2(), CP(), HT2(), TTTucker(), TT())}


def get(kind):
    """The Format for a kind name, with an error listing the known kinds."""
    if not isinstance(kind, str):
        raise TypeError("kind must be a str, got %r" % (kind,))
    try:
        return FORMATS[kind]
    except KeyError:
        raise ValueError("hsv::conv2d: unknown kind '%s'; expected one of: %s"
                         % (kind, ", ".join(repr(k) for k in sorted(FORMATS)))) from None


__all__ = ["FORMATS", "Format", "KernelShape", "check_call", "check_residual", "get", "memory_format_of_output"]
