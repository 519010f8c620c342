"""decompose(weight, method, ...) -> Factorization; one module per method."""
import inspect

import torch

from .._args import check_target
from . import cp as _cp
from . import hsv as _hsv
from . import ht2 as _ht2
from . import kcp as _kcp
from . import svd as _svd
from . import tt as _tt
from . import tt_tucker as _tt_tucker
from . import tucker2 as _tucker2

METHODS = {"svd": _svd.decompose, "hsv": _hsv.decompose, "kcp": _kcp.decompose, "tucker2": _tucker2.decompose,
           "cp": _cp.decompose, "ht2": _ht2.decompose, "tt_tucker": _tt_tucker.decompose,
           "tt": _tt.decompose}


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
    if weight.device.type == "meta":
        raise ValueError("weight is on the meta device: it has no values to decompose (load or materialize the "
                         "model's weights first)")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf values")


def decompose(weight, method="svd", *, rank=None, ratio=None, macs_ratio=None, **options):
    """Factorizes a conv weight (Cout, Cin, kh, kw).

    rank:       the method's rank(s), explicitly.
    ratio:      target parameter compression (dense params / factorized params), >= 1;
                the rank is the largest that meets it.
    macs_ratio: target MAC reduction at the layer (dense MACs / factorized MACs), >= 1,
                for the methods that take it (hsv, kcp, svd).
    Give rank, or one or both targets. Other options are method-specific.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError("unknown method %r; expected one of: %s" % (method, ", ".join(sorted(METHODS))))
    check_weight(weight)
    if rank is None and ratio is None and macs_ratio is None:
        raise ValueError("decompose(method=%r): give rank= or ratio= (or macs_ratio=)" % method)
    if rank is not None and (ratio is not None or macs_ratio is not None):
        raise ValueError("decompose(method=%r): give rank= or ratio=/macs_ratio=, not both" % method)
    targets = (("ratio", "a parameter compression", ratio), ("macs_ratio", "a MAC reduction", macs_ratio))
    for name, what, value in targets:
        check_target(name, value, what)
    if macs_ratio is not None:
        # Passed on only to methods that take it, so the others need no change.
        if "macs_ratio" not in inspect.signature(METHODS[method]).parameters:
            raise ValueError("decompose(method=%r) does not take macs_ratio=; use ratio= or rank=" % method)
        options["macs_ratio"] = macs_ratio
    with torch.no_grad():
        fact = METHODS[method](weight.detach(), rank=rank, ratio=ratio, **options)
    if not all(torch.isfinite(f).all() for f in fact.factors):
        # A finite weight must give finite factors; convert_ keeps such a layer dense with this reason.
        raise ValueError("decompose(method=%r) produced NaN or Inf factors for the finite weight of shape %s"
                         % (method, tuple(weight.shape)))
    return fact
