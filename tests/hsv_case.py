"""Fixtures for kind "hsv": random factors in each of its four layouts, and full-rank decompositions."""
import torch

import hsvkernels
from hsvkernels import Factorization
from hsvkernels.decompose import hsv as hsv_method

# Which level-2 splits are present: (B factored to rank q1, A factored to rank q2).
LAYOUTS = {"level1": (False, False), "q1": (True, False), "q2": (False, True), "q1q2": (True, True)}


def smallest_factor(n):
    """The smallest divisor above 1 (n itself when prime), so splits are non-trivial where they can be."""
    return next((d for d in range(2, n + 1) if n % d == 0), 1)


def default_split(shape):
    cout, cin = shape[0], shape[1]
    t2, s1 = smallest_factor(cout), smallest_factor(cin)
    return cout // t2, s1, t2, cin // s1


def random_factors(shape, dtype=torch.float64, device="cpu", layout="level1", rank=3, split=None):
    """Random hsv factors for a dense shape, scaled so the dense kernel has entries of about 1/sqrt(fan_in);
    split (T1, S1, T2, S2) defaults to default_split(shape)."""
    cout, cin, kh, kw = shape
    t1, s1, t2, s2 = split or default_split(shape)
    p = min(rank, hsv_method.max_rank(shape, (t1, s1, t2, s2)))
    split_b, split_a = LAYOUTS[layout]

    def rnd(*size, fan):
        return torch.randn(*size, dtype=dtype, device=device) / fan ** 0.5

    if split_b:
        q1 = max(1, min(p * t2, s2 * kh * kw) - 1)
        fs = [rnd(q1, s2, kh, kw, fan=s2 * kh * kw), rnd(p, t2, q1, fan=q1)]
    else:
        fs = [rnd(p, t2, s2, kh, kw, fan=s2 * kh * kw)]
    if split_a:
        q2 = max(1, min(t1, s1 * p) - 1)
        fs += [rnd(q2, s1, p, fan=s1 * p), rnd(t1, q2, fan=q2)]
    else:
        fs.append(rnd(t1, s1, p, fan=s1 * p))
    return Factorization("hsv", fs, shape)


def full_rank(weight):
    split = default_split(tuple(weight.shape))
    return hsvkernels.decompose(weight, "hsv", split=split, rank=hsv_method.max_rank(tuple(weight.shape), split))
