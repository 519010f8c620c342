"""Factorization: a conv kernel stored as factors of one kind, with its costs."""
import math
from dataclasses import dataclass, field

import torch

from . import formats


@dataclass
class Factorization:
    """A (Cout, Cin, kh, kw) conv kernel stored as `factors` of format `kind`.

    `meta` holds what the decomposition chose (ranks, split, ...) for reports and
    save files; everything the op needs is in the factor shapes.
    """

    kind: str
    factors: list
    shape: tuple
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.factors = list(self.factors)
        ks = self.format.kernel_shape([tuple(f.shape) for f in self.factors])
        derived = (ks.out_channels, ks.in_channels, ks.kh, ks.kw)
        if tuple(self.shape) != derived:
            raise ValueError("Factorization: shape %s does not match the factors, which give %s"
                             % (tuple(self.shape), derived))
        self.shape = derived

    @property
    def format(self):
        return formats.get(self.kind)

    def to_dense(self):
        """The dense kernel the factors represent."""
        return self.format.to_dense(self.factors)

    def num_params(self):
        return self.format.num_params([tuple(f.shape) for f in self.factors])

    def dense_params(self):
        return math.prod(self.shape)

    def compression(self):
        """Parameter compression: dense parameters / factorized parameters."""
        return self.dense_params() / self.num_params()

    def macs(self, out_h, out_w, in_h=None, in_w=None):
        """Multiply-accumulates per image at output size (out_h, out_w).

        Stages that run at the input resolution (a leading 1x1 before a strided
        conv, in some kinds) need in_h/in_w; they default to the output size.
        """
        in_hw = (out_h if in_h is None else in_h, out_w if in_w is None else in_w)
        return sum(self.format.stage_macs([tuple(f.shape) for f in self.factors], in_hw, (out_h, out_w)))

    def dense_macs(self, out_h, out_w):
        return math.prod(self.shape) * out_h * out_w

    def relative_error(self, weight):
        """||W - W_hat||_F / ||W||_F, computed in float64."""
        w = weight.detach().to(torch.float64)
        diff = w - self.to_dense().detach().to(device=w.device, dtype=torch.float64)
        return (torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(w).clamp_min(1e-300)).item()

    def to(self, *args, **kwargs):
        return Factorization(self.kind, [f.to(*args, **kwargs) for f in self.factors], self.shape, dict(self.meta))

    def __repr__(self):
        return "Factorization(kind=%r, shape=%s, factors=%s, meta=%s)" % (
            self.kind, tuple(self.shape), [tuple(f.shape) for f in self.factors], self.meta)
