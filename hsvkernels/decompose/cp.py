"""CP-4 of a conv kernel (Lebedev et al. 2015), fitted by regularised, deterministic ALS.

W[t,s,i,j] ~= sum_r A_T[t,r] A_S[r,s] A_h[r,i] A_w[r,j]. Lebedev et al. used
non-linear least squares and then fine-tuned; here the fit is alternating least
squares started from the leading singular vectors of each unfolding (columns past
a mode's size are filled from a fixed-seed generator), with a tiny ridge term that
keeps each normal-equation solve well posed when components become collinear (the
instability Phan et al. 2020 describe), column normalisation each step, and a
stop on the relative change of the fit. The same weight always gives the same factors.

At rank R = min(Cin, Cout)*kh*kw (the largest accepted) the kernel is represented
exactly without fitting: one rank-1 term per (channel, i, j) of the smaller channel
side. ratio= gives the largest R with R*(Cin + kh + kw + Cout) <= dense / ratio.
"""
import torch

from ..factorization import Factorization
from . import _cp_batched
from ._linalg import align


def max_rank(shape):
    cout, cin, kh, kw = shape
    return min(cin, cout) * kh * kw


def rank_for_ratio(shape, ratio):
    cout, cin, kh, kw = shape
    dense = cout * cin * kh * kw
    r = min(int(dense // (ratio * (cin + kh + kw + cout))), max_rank(shape))
    if r < 1:
        raise ValueError("cp: ratio %g is out of reach for shape %s: rank 1 already compresses only %.3gx"
                         % (ratio, shape, dense / (cin + kh + kw + cout)))
    return align(r)


def exact_factors(w):
    """A CP of rank min(Cin, Cout)*kh*kw that reproduces w exactly: (A_T, A_S, A_h, A_w), each (dim, R)."""
    cout, cin, kh, kw = w.shape
    eye_h = torch.eye(kh, dtype=w.dtype, device=w.device)
    eye_w = torch.eye(kw, dtype=w.dtype, device=w.device)
    if cin <= cout:  # term (s, i, j): A_S = e_s, A_h = e_i, A_w = e_j, A_T = W[:, s, i, j]
        a_t = w.reshape(cout, -1)
        a_s = torch.eye(cin, dtype=w.dtype, device=w.device).repeat_interleave(kh * kw, dim=1)
    else:  # term (t, i, j): A_T = e_t, A_S = W[t, :, i, j]
        a_s = w.permute(1, 0, 2, 3).reshape(cin, -1)
        a_t = torch.eye(cout, dtype=w.dtype, device=w.device).repeat_interleave(kh * kw, dim=1)
    a_h = eye_h.repeat_interleave(kw, dim=1).repeat(1, a_t.shape[1] // (kh * kw))
    a_w = eye_w.repeat(1, kh).repeat(1, a_t.shape[1] // (kh * kw))
    return [a_t, a_s, a_h, a_w]


def als(w, r, iters=500, tol=1e-6, ridge=1e-12, seed=0):
    """CP-ALS of a float64 4-way tensor: ([A_T, A_S, A_h, A_w], relative error, sweeps run).

    The batched ALS that KCP uses (_cp_batched.py) on a batch of one, stopping on the relative change of the fit.
    """
    factors, err, sweeps = _cp_batched.als(w[None], r, iters, tol, ridge, seed, relative_tol=True)
    return [f[0] for f in factors], err[0].item(), sweeps


def balance(factors):
    """Equal column norms across the four factors (signs stay in A_T): better fp32 conditioning."""
    norms = [f.norm(dim=0).clamp_min(torch.finfo(f.dtype).tiny) for f in factors]
    scale = torch.stack(norms).prod(dim=0) ** 0.25
    return [f / n * scale for f, n in zip(factors, norms)]


def decompose(weight, *, rank=None, ratio=None, iters=500, tol=1e-6, ridge=1e-12, seed=0):
    shape = tuple(weight.shape)
    if ratio is not None:
        rank = rank_for_ratio(shape, ratio)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError("cp rank must be an int, got %r" % (rank,))
    if not 1 <= rank <= max_rank(shape):
        raise ValueError("cp rank must be in [1, min(Cin, Cout)*kh*kw] = [1, %d] for shape %s, got %d"
                         % (max_rank(shape), shape, rank))
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError("cp iters must be an int >= 1, got %r" % (iters,))
    w = weight.to(torch.float64)
    if rank == max_rank(shape):
        factors, sweeps = exact_factors(w), 0
    else:
        factors, _, sweeps = als(w, rank, iters, tol, ridge, seed)
    a_t, a_s, a_h, a_w = balance(factors)
    out = [a_s.T, a_h.T, a_w.T, a_t]
    fact = Factorization("cp", [f.to(weight.dtype).contiguous() for f in out], shape,
                         {"rank": rank, "sweeps": sweeps})
    fact.meta["rel_err"] = fact.relative_error(w)
    return fact
