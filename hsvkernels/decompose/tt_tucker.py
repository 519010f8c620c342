"""TT-Tucker (methods.md 5.4): Tucker-2 on the channels, then a tensor train of the core.

The Tucker-2 core (R_T, R_S, kh, kw), in TT mode order (R_S, kh, kw, R_T), is split
by one truncated SVD of its (R_S*kh) x (kw*R_T) matricization at TT rank a; the
singular values go to the second core. rank=(R_T, R_S, a), an int for all three, or
"evbmf": EVBMF of the two channel unfoldings, then of the core's matricization.
"""
import torch

from .. import formats
from ..evbmf import evbmf
from ..factorization import Factorization
from . import ht2, tucker2
from ._budget import ranks_for_ratio
from ._linalg import fix_signs
from ._ranks import check_ranks
from .candidates import Candidate

NAMES = ("R_T", "R_S", "a")


def max_ranks(shape):
    cout, cin, kh, kw = shape
    rt, rs = tucker2.max_ranks(shape)
    return (rt, rs, min(rs * kh, kw * rt))


def num_params(shape, ranks):
    cout, cin, kh, kw = shape
    rt, rs, a = ranks
    return cin * rs + kh * rs * a + kw * a * rt + rt * cout


def split_core(core, a):
    """TT of a (R_T, R_S, kh, kw) core at rank a: G1 (a, R_S, kh), G2 (R_T, a, kw)."""
    rt, rs, kh, kw = core.shape
    m = core.permute(1, 2, 3, 0).reshape(rs * kh, kw * rt)
    u, s, vh = torch.linalg.svd(m, full_matrices=a > min(m.shape))
    u = fix_signs(u[:, :a])
    rest = u.T @ m  # (a, kw*R_T): the projection, so a > rank(m) stays exact
    g1 = u.reshape(rs, kh, a).permute(2, 0, 1)
    g2 = rest.reshape(a, kw, rt).permute(2, 0, 1)
    return g1, g2


def decompose(weight, *, rank=None, ratio=None, iters=0):
    shape = tuple(weight.shape)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError("tt_tucker iters (HOOI sweeps) must be an int >= 0, got %r" % (iters,))
    cout, cin, kh, kw = shape
    w = weight.to(torch.float64)
    if ratio is not None:
        rt, rs, a = ranks_for_ratio(max_ranks(shape), lambda r: num_params(shape, r), w.numel(), ratio, "tt_tucker")
        a = min(a, rs * kh, kw * rt)  # rounding can overshoot what the leaves can feed
    elif isinstance(rank, str):
        if rank != "evbmf":
            raise ValueError("tt_tucker rank rule must be 'evbmf', got %r" % (rank,))
        rt, rs = tucker2.evbmf_ranks(w)
        a = None  # from the core, once it exists
    else:
        rt, rs, a = check_ranks(rank, NAMES, max_ranks(shape), "tt_tucker", shape)
        if a > min(rs * kh, kw * rt):
            raise ValueError("tt_tucker rank a must be in [1, min(R_S*kh, kw*R_T)] = [1, %d] for ranks %s, got %d"
                             % (min(rs * kh, kw * rt), (rt, rs, a), a))
    u_t, core, u_s = tucker2.fit(w, rt, rs, iters)
    if a is None:
        a = max(1, evbmf(core.permute(1, 2, 3, 0).reshape(rs * kh, kw * rt)))
    g1, g2 = split_core(core, a)
    factors = [u_s.T, g1, g2, u_t]
    fact = Factorization("tt_tucker", [f.to(weight.dtype).contiguous() for f in factors], shape,
                         {"R_T": rt, "R_S": rs, "a": a, "iters": iters})
    return fact


def candidates(weight, out_hw, fractions=ht2.FRACTIONS):
    """Without HOOI sweeps, TT-Tucker at (R_T, R_S, a) is HT-2 at (R_S, a, R_T): the same
    exact errors. MACs take the input size = out_hw."""
    shape = tuple(weight.shape)
    fmt = formats.get("tt_tucker")
    out = []
    for (r1, r13, r3), err in ht2.rank_errors(weight, fractions):
        macs = sum(fmt.stage_macs(ht2.stage_shapes(shape, (r1, r13, r3)), out_hw, out_hw))
        out.append(Candidate({"rank": (r3, r1, r13)}, num_params(shape, (r3, r1, r13)), macs, err))
    return out
