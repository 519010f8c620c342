"""Tucker-2 of a conv kernel on its two channel modes (Kim et al. 2016).

HOSVD: U_T and U_S are the leading left singular vectors of the Cout- and
Cin-unfoldings, and the core is W projected on both. `iters` HOOI sweeps then
refine each leaf against the other (never worse in the Frobenius norm).
rank=(R_T, R_S), an int for both, or "evbmf" (EVBMF of each unfolding, floored at 1).
"""
import torch

from .. import formats
from ..evbmf import evbmf
from ..factorization import Factorization
from ._budget import ranks_for_ratio
from ._linalg import leading_left, unfold
from ._ranks import check_ranks
from .candidates import Candidate

NAMES = ("R_T", "R_S")
FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def max_ranks(shape):
    cout, cin, kh, kw = shape
    return (min(cout, cin * kh * kw), min(cin, cout * kh * kw))


def num_params(shape, ranks):
    cout, cin, kh, kw = shape
    rt, rs = ranks
    return cin * rs + kh * kw * rs * rt + rt * cout


def evbmf_ranks(w):
    """(R_T, R_S) from EVBMF of the Cout- and Cin-unfoldings, floored at 1."""
    return tuple(max(1, evbmf(unfold(w, mode))) for mode in (0, 1))


def fit(w, rt, rs, iters=0):
    """Tucker-2 of a float64 kernel: (U_T (Cout, R_T), core (R_T, R_S, kh, kw), U_S (Cin, R_S))."""
    u_t = leading_left(unfold(w, 0), rt)
    u_s = leading_left(unfold(w, 1), rs)
    for _ in range(iters):
        u_t = leading_left(unfold(torch.einsum("tsij,sd->tdij", w, u_s), 0), rt)
        u_s = leading_left(unfold(torch.einsum("tsij,tc->csij", w, u_t), 1), rs)
    core = torch.einsum("tsij,tc,sd->cdij", w, u_t, u_s)
    return u_t, core, u_s


def resolve_ranks(w, shape, rank, ratio, method="tucker2"):
    if ratio is not None:
        return ranks_for_ratio(max_ranks(shape), lambda r: num_params(shape, r), w.numel(), ratio, method)
    if isinstance(rank, str):
        if rank != "evbmf":
            raise ValueError("%s rank rule must be 'evbmf', got %r" % (method, rank))
        return evbmf_ranks(w)
    return check_ranks(rank, NAMES, max_ranks(shape), method, shape)


def decompose(weight, *, rank=None, ratio=None, iters=0):
    shape = tuple(weight.shape)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError("tucker2 iters (HOOI sweeps) must be an int >= 0, got %r" % (iters,))
    w = weight.to(torch.float64)
    rt, rs = resolve_ranks(w, shape, rank, ratio)
    u_t, core, u_s = fit(w, rt, rs, iters)
    factors = [u_s.T, core, u_t]
    energy = (core.square().sum() / w.square().sum().clamp_min(1e-300)).item()
    factors = [f.to(weight.dtype).contiguous() for f in factors]
    return Factorization("tucker2", factors, shape, {"R_T": rt, "R_S": rs, "iters": iters, "energy": energy})


def candidates(weight, out_hw, fractions=FRACTIONS):
    """Proportionally scaled (R_T, R_S), each with the exact HOSVD error.

    With the full singular bases of both unfoldings, W's coordinates C in them hold
    all its energy, and the truncation to (R_T, R_S) is an orthogonal projection that
    keeps C[:R_T, :R_S]; so one projection gives the error of every rank pair.
    MACs assume the input and output sizes are equal (out_hw for both).
    """
    shape = tuple(weight.shape)
    w = weight.detach().to(torch.float64)
    u_t = torch.linalg.svd(unfold(w, 0), full_matrices=False)[0]
    u_s = torch.linalg.svd(unfold(w, 1), full_matrices=False)[0]
    energy = torch.einsum("tsij,tc,sd->cdij", w, u_t, u_s).square().sum(dim=(2, 3))
    kept = energy.cumsum(0).cumsum(1) / w.square().sum().clamp_min(1e-300)  # kept[R_T-1, R_S-1]
    fmt = formats.get("tucker2")
    seen, out = set(), []
    for f in fractions:
        ranks = tuple(max(1, round(f * m)) for m in max_ranks(shape))
        if ranks in seen:
            continue
        seen.add(ranks)
        rt, rs = ranks
        shapes = [(rs, shape[1]), (rt, rs) + shape[2:], (shape[0], rt)]
        macs = sum(fmt.stage_macs(shapes, out_hw, out_hw))
        err = max(0.0, 1.0 - kept[rt - 1, rs - 1].item())
        out.append(Candidate({"rank": ranks}, num_params(shape, ranks), macs, err))
    return out
