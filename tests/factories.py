"""Per-kind test fixtures: how to get factors of each kind for a given dense shape.

Every kind registered here runs through the whole op test matrix (test_op.py,
test_autograd.py). A new kind adds one KindCase.
"""
from dataclasses import dataclass
from typing import Callable

import torch

import hsvkernels
from hsvkernels import Factorization


@dataclass
class KindCase:
    # random factors for a dense shape (Cout, Cin, kh, kw); not a decomposition of anything
    random: Callable
    # a decomposition of `weight` that reproduces it exactly (full rank)
    full_rank: Callable
    # whether the kind can represent this dense shape (e.g. channel counts that factor)
    supports: Callable = lambda shape: True


def _svd_random(shape, dtype=torch.float64, device="cpu"):
    cout, cin, kh, kw = shape
    r = max(1, min(cout, cin * kh * kw) // 2)
    v = torch.randn(r, cin, kh, kw, dtype=dtype, device=device) / (cin * kh * kw) ** 0.5
    u = torch.randn(cout, r, dtype=dtype, device=device) / r ** 0.5
    return Factorization("svd", [v, u], shape)


def _svd_full(weight):
    cout, cin, kh, kw = weight.shape
    return hsvkernels.decompose(weight, "svd", rank=min(cout, cin * kh * kw))


def _kcp_random(shape, dtype=torch.float64, device="cpu", merged=False):
    from hsvkernels.decompose import kcp
    split = kcp.default_splits(*shape[:2])[0]
    n_max, r_max, q_max = kcp.bounds(shape, split)
    rank = (min(2, n_max), min(3, r_max), min(2, q_max))
    factors = [torch.randn(s, dtype=dtype, device=device) for s in kcp.factor_shapes(shape, split, rank, merged)]
    return Factorization("kcp", factors, shape)


def _kcp_full(weight):
    from hsvkernels.decompose import kcp
    split = kcp.default_splits(*weight.shape[:2])[0]
    return hsvkernels.decompose(weight, "kcp", rank=kcp.bounds(weight.shape, split), split=split)


CASES = {
    "svd": KindCase(_svd_random, _svd_full),
    "kcp": KindCase(_kcp_random, _kcp_full),
}

KINDS = sorted(k for k in CASES if k in hsvkernels.FORMATS)
