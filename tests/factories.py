"""Per-kind test fixtures: how to get factors of each kind for a given dense shape.

Every kind registered here runs through the whole op test matrix (test_op.py,
test_autograd.py). A new kind adds one KindCase.
"""
from dataclasses import dataclass
from typing import Callable

import torch

import hsv_case

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


CASES = {
    "svd": KindCase(_svd_random, _svd_full),
    "hsv": KindCase(hsv_case.random_factors, hsv_case.full_rank),
}

KINDS = sorted(k for k in CASES if k in hsvkernels.FORMATS)
