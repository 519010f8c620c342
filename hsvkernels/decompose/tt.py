"""TT-conv (Garipov et al. 2016): TT-SVD of the kernel with tensorized channels.

Input channels S = Cin = S_1*...*S_d, output channels T = Cout = T_1*...*T_d (row-major).
The kernel, reshaped to (T_1, S_1, T_2, S_2, ..., T_d, S_d, kh*kw), is split by a
left-to-right TT-SVD: at step k the carried (r_{k-1}*T_k*S_k) x (rest) matrix gives its
top r_k left singular vectors as G_k, and its projection on them is carried on; what is
left at the end is the spatial core K (r_d, kh, kw). Every G_k is orthonormal as an
(r_{k-1}*T_k*S_k) x r_k matrix, so the result is an orthogonal projection of W and
||W - W_hat||^2 = ||W||^2 - ||K||^2 (meta "energy" = ||K||^2 / ||W||^2).
Layout and run time: hsvkernels/formats/tt.py.

Channel modes: in_modes=/out_modes= by hand (each must multiply to Cin / Cout), or
automatic: d = min(3, prime factors of Cin, prime factors of Cout) modes, each side split
as evenly as possible; input modes ascending and output modes descending, which keeps
the middle contractions (cost S_1..S_k * T_k..T_d * r_{k-1} * r_k per position) small.
`d=` asks for another number of modes (sides with too few prime factors get modes of 1).
A channel count with no usable factors (Cin = 3, a prime) gives d = 1: a kh x kw conv
1 -> r on every input channel, then one 1x1 Cin*r -> Cout, the rank-r split of the
(Cout*Cin) x (kh*kw) matrix.

Ranks (r_1, ..., r_d) (r_0 = 1): rank= a tuple, or an int for all, capped at each
r_k's bound min(r_{k-1}*T_k*S_k, T_{k+1}S_{k+1}...T_dS_d*kh*kw) so that a large int gives
the exact train. ratio= and/or macs_ratio= take the largest such uniform rank whose
parameters are within dense/ratio and whose MACs are within dense/macs_ratio; with
ratio= alone the MACs are still held to at most dense (TT-conv compresses parameters
much more than MACs, so the parameter budget alone can pick a layer slower than dense).
"""
import math

import torch

from .. import formats
from ..factorization import Factorization
from ._linalg import fix_signs
from .candidates import Candidate

DEFAULT_D = 3
# Uniform ranks offered to rank selection (capped per layer at the bounds).
CANDIDATE_RANKS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def prime_factors(n):
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def split_modes(n, d):
    """n as d factors, as even as possible (smallest largest factor, then largest smallest), ascending.

    Modes of 1 appear only when n has fewer than d prime factors.
    """
    best = None

    def search(rest, parts, low):
        nonlocal best
        if len(parts) == d - 1:
            if rest >= low:
                cand = tuple(parts) + (rest,)
                if best is None or (cand[-1], -cand[0]) < (best[-1], -best[0]):
                    best = cand
            return
        f = low
        while f ** (d - len(parts)) <= rest:  # the parts ascend, so f is at most the remaining root
            if rest % f == 0:
                search(rest // f, parts + [f], f)
            f += 1

    search(n, [], 1)
    return best


def _check_modes(modes, channels, name):
    if isinstance(modes, int) or not isinstance(modes, (tuple, list)) or not modes:
        raise TypeError("tt %s must be a non-empty tuple of ints, got %r" % (name, modes))
    for m in modes:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError("tt %s must hold positive ints, got %r" % (name, tuple(modes)))
    if math.prod(modes) != channels:
        raise ValueError("tt %s %s multiply to %d, but the weight has %s = %d"
                         % (name, tuple(modes), math.prod(modes), "Cin" if name == "in_modes" else "Cout", channels))
    return tuple(modes)


def channel_modes(shape, d=None, in_modes=None, out_modes=None):
    """(out_modes, in_modes) for a weight shape: the given ones checked, the others chosen."""
    cout, cin = shape[0], shape[1]
    if in_modes is not None:
        in_modes = _check_modes(in_modes, cin, "in_modes")
    if out_modes is not None:
        out_modes = _check_modes(out_modes, cout, "out_modes")
    given = [len(m) for m in (in_modes, out_modes) if m is not None]
    if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
        raise ValueError("tt d (number of channel modes) must be a positive int, got %r" % (d,))
    if given and d is not None and any(g != d for g in given):
        raise ValueError("tt d = %d does not match the %d given modes" % (d, given[0]))
    if len(set(given)) > 1:
        raise ValueError("tt in_modes %s and out_modes %s must have the same length d" % (in_modes, out_modes))
    if given:
        d = given[0]
    elif d is None:
        d = max(1, min(DEFAULT_D, len(prime_factors(cin)), len(prime_factors(cout))))
    if in_modes is None:
        in_modes = split_modes(cin, d)                       # ascending
    if out_modes is None:
        out_modes = tuple(reversed(split_modes(cout, d)))    # descending
    return out_modes, in_modes


def rank_bounds(shape, out_modes, in_modes):
    """The largest useful r_k, k = 1..d: min(T_1S_1...T_kS_k, T_{k+1}S_{k+1}...T_dS_d*kh*kw)."""
    pairs = [t * s for t, s in zip(out_modes, in_modes)]
    k2 = shape[2] * shape[3]
    return tuple(min(math.prod(pairs[:k + 1]), math.prod(pairs[k + 1:]) * k2) for k in range(len(pairs)))


def uniform_ranks(r, bounds):
    return tuple(min(r, b) for b in bounds)


def layout(shape, out_modes, in_modes, ranks):
    return formats.tt.Layout(tuple(out_modes), tuple(in_modes), (1,) + tuple(ranks), shape[2], shape[3])


def factor_shapes(shape, out_modes, in_modes, ranks):
    full = (1,) + tuple(ranks)
    shapes = [(full[k], out_modes[k], in_modes[k], full[k + 1]) for k in range(len(in_modes))]
    return shapes + [(full[-1], shape[2], shape[3])]


def num_params(shape, out_modes, in_modes, ranks):
    return sum(math.prod(s) for s in factor_shapes(shape, out_modes, in_modes, ranks))


def macs_per_position(shape, out_modes, in_modes, ranks):
    return sum(formats.tt.TT.macs_per_position(layout(shape, out_modes, in_modes, ranks)))


def check_rank(rank, shape, out_modes, in_modes):
    bounds = rank_bounds(shape, out_modes, in_modes)
    d = len(bounds)
    if isinstance(rank, int) and not isinstance(rank, bool):
        if rank < 1:
            raise ValueError("tt rank must be >= 1, got %d" % rank)
        return uniform_ranks(rank, bounds)
    if not isinstance(rank, (tuple, list)) or len(rank) != d:
        raise TypeError("tt rank must be an int or a tuple (r_1, ..., r_%d) of %d ints for modes out %s / in %s, "
                        "got %r" % (d, d, out_modes, in_modes, rank))
    prev = 1
    for k, (r, bound) in enumerate(zip(rank, bounds)):
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError("tt rank r_%d must be an int, got %r" % (k + 1, r))
        # The step-k SVD has r_{k-1}*T_k*S_k rows, so a small r_{k-1} bounds r_k too.
        bound = min(bound, prev * out_modes[k] * in_modes[k])
        if not 1 <= r <= bound:
            raise ValueError("tt rank r_%d must be in [1, %d] for shape %s with modes out %s / in %s and r_%d = %d, "
                             "got %d" % (k + 1, bound, shape, out_modes, in_modes, k, prev, r))
        prev = r
    return tuple(rank)


def ranks_for_targets(shape, out_modes, in_modes, ratio=None, macs_ratio=None):
    """The largest uniform rank (capped at the bounds) within both budgets; MACs never above dense."""
    bounds = rank_bounds(shape, out_modes, in_modes)
    dense = math.prod(shape)
    param_budget = dense / ratio if ratio is not None else math.inf
    mac_budget = dense / (macs_ratio if macs_ratio is not None else 1.0)
    for r in range(max(bounds), 0, -1):
        ranks = uniform_ranks(r, bounds)
        if (num_params(shape, out_modes, in_modes, ranks) <= param_budget
                and macs_per_position(shape, out_modes, in_modes, ranks) <= mac_budget):
            return ranks
    ones = uniform_ranks(1, bounds)
    raise ValueError("tt: ratio %s / macs_ratio %s is out of reach for shape %s with modes out %s / in %s: ranks %s "
                     "already compress only %.3gx in parameters and %.3gx in MACs"
                     % (ratio, macs_ratio, shape, out_modes, in_modes, ones,
                        dense / num_params(shape, out_modes, in_modes, ones),
                        dense / macs_per_position(shape, out_modes, in_modes, ones)))


def tt_svd(w, out_modes, in_modes, ranks):
    """TT-SVD of a float64 kernel: ([G_1, ..., G_d, K], ||K||^2 / ||W||^2)."""
    cout, cin, kh, kw = w.shape
    d = len(in_modes)
    t = w.reshape(*out_modes, *in_modes, kh * kw)
    t = t.permute(*[m for k in range(d) for m in (k, d + k)], 2 * d)  # (T_1, S_1, ..., T_d, S_d, kh*kw)
    carry, r_prev, cores = t.reshape(1, -1), 1, []
    for k in range(d):
        m = carry.reshape(r_prev * out_modes[k] * in_modes[k], -1)
        u = fix_signs(torch.linalg.svd(m, full_matrices=False)[0][:, :ranks[k]])
        carry = u.T @ m  # the projection on the kept subspace, carried to the next step
        cores.append(u.reshape(r_prev, out_modes[k], in_modes[k], ranks[k]))
        r_prev = ranks[k]
    cores.append(carry.reshape(r_prev, kh, kw))
    energy = (carry.square().sum() / w.square().sum().clamp_min(1e-300)).item()
    return cores, energy


def decompose(weight, *, rank=None, ratio=None, macs_ratio=None, d=None, in_modes=None, out_modes=None):
    shape = tuple(weight.shape)
    out_modes, in_modes = channel_modes(shape, d, in_modes, out_modes)
    if rank is not None:
        if isinstance(rank, str):
            raise ValueError("tt rank must be an int or a tuple of ints, got %r" % (rank,))
        ranks = check_rank(rank, shape, out_modes, in_modes)
    else:
        ranks = ranks_for_targets(shape, out_modes, in_modes, ratio, macs_ratio)
    cores, energy = tt_svd(weight.to(torch.float64), out_modes, in_modes, ranks)
    factors = [f.to(weight.dtype).contiguous() for f in cores]
    meta = {"ranks": ranks, "out_modes": out_modes, "in_modes": in_modes, "energy": energy}
    return Factorization("tt", factors, shape, meta)


def candidates(weight, out_hw, ranks=CANDIDATE_RANKS):
    """Uniform ranks on the automatic modes, each with its exact error (one TT-SVD each).

    Only configurations with fewer parameters and MACs than dense are offered.
    """
    shape = tuple(weight.shape)
    out_modes, in_modes = channel_modes(shape)
    bounds = rank_bounds(shape, out_modes, in_modes)
    dense = math.prod(shape)
    w = weight.detach().to(torch.float64)
    positions = out_hw[0] * out_hw[1]
    seen, out = set(), []
    for r in ranks:
        rk = uniform_ranks(r, bounds)
        if rk in seen:
            continue
        seen.add(rk)
        params = num_params(shape, out_modes, in_modes, rk)
        macs = macs_per_position(shape, out_modes, in_modes, rk)
        if params >= dense or macs > dense:
            continue
        _, energy = tt_svd(w, out_modes, in_modes, rk)
        config = {"rank": rk, "in_modes": in_modes, "out_modes": out_modes}
        out.append(Candidate(config, params, macs * positions, max(0.0, 1.0 - energy)))
    return out
