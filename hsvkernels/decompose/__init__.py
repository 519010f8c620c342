"""decompose(weight, method, ...) -> Factorization; one module per method."""
import torch

from . import cp as _cp
from . import ht2 as _ht2
from . import svd as _svd
from . import tt_tucker as _tt_tucker
from . import tucker2 as _tucker2

METHODS = {"svd": _svd.decompose, "tucker2": _tucker2.decompose, "cp": _cp.decompose, "ht2": _ht2.decompose,
           "tt_tucker": _tt_tucker.decompose}


def check_weight(weight):
    """A conv weight must be a finite, floating point 4-D tensor."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError("weight must be a torch.Tensor, got %s" % type(weight).__name__)
    if weight.dim() != 4:
        raise ValueError("weight must be 4-D (Cout, Cin, kh, kw), got shape %s" % (tuple(weight.shape),))
    if not weight.is_floating_point():
        raise ValueError("weight must be a floating point tensor, got %s" % weight.dtype)
    if weight.numel() == 0:
        raise ValueError("weight is empty: shape %s" % (tuple(weight.shape),))
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf values")


def decompose(weight, method="svd", *, rank=None, ratio=None, **options):
    """Factorizes a conv weight (Cout, Cin, kh, kw).

    rank:  the method's rank(s), explicitly.
    ratio: target parameter compression (dense params / factorized params), >= 1;
           the rank is the largest that meets it.
    Exactly one of rank and ratio is given. Other options are method-specific.
    """
    if method not in METHODS:
        raise ValueError("unknown method %r; expected one of: %s" % (method, ", ".join(sorted(METHODS))))
    check_weight(weight)
    if rank is None and ratio is None:
        raise ValueError("decompose(method=%r): give rank= or ratio=" % method)
    if rank is not None and ratio is not None:
        raise ValueError("decompose(method=%r): give rank= or ratio=, not both" % method)
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 1:
            raise ValueError("ratio is a parameter compression and must be a number >= 1, got %r" % (ratio,))
    with torch.no_grad():
        return METHODS[method](weight.detach(), rank=rank, ratio=ratio, **options)
