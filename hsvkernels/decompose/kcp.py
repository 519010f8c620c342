"""2nd-order Kronecker CP (KCP) of a conv kernel; layout in hsvkernels/formats/kcp.py.

    W = sum_n B_n (x) A_n,  B_n (T1 x S1) of rank Q,  A_n (T2 x S2 x kh x kw) of CP rank R

1. KT rank N: SVD of the rearranged matrix R(W) (T1*S1, T2*S2*kh*kw) whose rows
   are vec(B) and columns vec(A) (Van Loan-Pitsianis), truncated to N terms.
2. Each B_n: truncated SVD to rank Q (optimal).
3. Each A_n: CP-ALS to rank R (_cp_batched: one ALS batched over the N terms, SVD init).
   Size-1 modes (1x1 kernels, degenerate splits) are dropped first; with two or
   fewer modes left the CP is a matrix SVD, which is optimal. At the CP bound
   R = prod(dims) / max(dims) we write the exact CP directly (one term per fiber
   of the largest mode), so full ranks reproduce W exactly.

Exact recovery of a synthetic KCP kernel needs the SVD of step 1 to return its
terms, which holds when the B_n (or A_n) are mutually orthogonal; otherwise the
SVD mixes the terms and the mixed A_n have CP rank up to N*R (no KT-rank-aware
CP is attempted). Tests check the identifiable case.

split = (T1, S1), the outer (channel-only) sizes; T2 = Cout/T1, S2 = Cin/S1.
Channel counts that do not factor (primes, the 3-channel stem) keep the trivial
splits T1 or S1 in {1, C}: T1 = S1 = 1 makes W a plain CP of the whole kernel.
They are always available, so choosing a split never fails; only a target that
no configuration reaches raises.
"""
import math

import torch

from .._threads import single_threaded
from . import _cp_batched
from ..factorization import Factorization
from ..formats.kcp import KCP
from .candidates import Candidate
from .._args import check_target as _check_target

_FORMAT = KCP()
_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # ranks tried by the automatic choice
_COARSE = (1, 2, 4, 8, 16, 32, 64)                   # ranks offered to model-wide selection (cost of estimates)


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def default_splits(cout, cin, per_side=2):
    """The per_side divisors of Cout and of Cin nearest their square roots, crossed.

    Balanced splits give both Kronecker sides room; 1 is a divisor, so a prime
    channel count still gets a split (the trivial one).
    """
    def near_root(c):
        return sorted(divisors(c), key=lambda d: (abs(math.log(d) - 0.5 * math.log(c)), d))[:per_side]
    return [(t1, s1) for t1 in sorted(near_root(cout)) for s1 in sorted(near_root(cin))]


def cp_bound(dims):
    """A CP rank that is always exact: one term per fiber along the largest mode."""
    return math.prod(dims) // max(dims)


def bounds(shape, split):
    """(N_max, R_max, Q_max) for a kernel shape and split, after checking the split."""
    cout, cin, kh, kw = shape
    t1, s1 = check_split(shape, split)
    t2, s2 = cout // t1, cin // s1
    return min(t1 * s1, t2 * s2 * kh * kw), cp_bound((t2, s2, kh, kw)), min(t1, s1)


def check_split(shape, split):
    cout, cin = shape[0], shape[1]
    try:
        t1, s1 = (int(v) for v in split)
    except (TypeError, ValueError):
        raise ValueError("kcp split must be a pair (T1, S1) of ints, got %r" % (split,)) from None
    if t1 < 1 or s1 < 1 or cout % t1 or cin % s1:
        raise ValueError("kcp split (T1, S1) = (%d, %d) must divide (Cout, Cin) = (%d, %d); divisors of Cout: %s, "
                         "of Cin: %s" % (t1, s1, cout, cin, divisors(cout), divisors(cin)))
    return t1, s1


def check_rank(shape, split, rank):
    try:
        n, r, q = (int(v) for v in rank)
    except (TypeError, ValueError):
        raise ValueError("kcp rank must be a triple (N, R, Q) = (KT rank, CP rank, channel rank), got %r"
                         % (rank,)) from None
    n_max, r_max, q_max = bounds(shape, split)
    for name, v, hi in (("N (KT rank)", n, n_max), ("R (CP rank)", r, r_max), ("Q (channel rank)", q, q_max)):
        if not 1 <= v <= hi:
            raise ValueError("kcp %s must be in [1, %d] for shape %s and split %s, got %d"
                             % (name, hi, tuple(shape), tuple(split), v))
    return n, r, q


def factor_shapes(shape, split, rank, merged=False):
    cout, cin, kh, kw = shape
    t1, s1 = split
    n, r, q = rank
    t2, s2 = cout // t1, cin // s1
    head = [(q, n, s1), (n, r, s2), (n, r, kh), (n, r, kw)]
    return head + ([(cout, q, n, r)] if merged else [(n, t2, r), (t1, q, n)])


def costs(shape, split, rank, merged=False, out_hw=(1, 1), in_hw=None):
    """(params, MACs per image) of one configuration."""
    shapes = factor_shapes(shape, split, rank, merged)
    macs = sum(_FORMAT.stage_macs(shapes, tuple(in_hw or out_hw), tuple(out_hw)))
    return sum(math.prod(s) for s in shapes), macs


def rearrange(w, t1, s1):
    """R(W) (T1*S1, T2*S2*kh*kw): row (t1, s1), column (t2, s2, i, j)."""
    cout, cin, kh, kw = w.shape
    return (w.reshape(t1, cout // t1, s1, cin // s1, kh, kw).permute(0, 2, 1, 3, 4, 5)
            .reshape(t1 * s1, -1))


# CP of the spatial factors, batched over the KT terms ------------------------------

def _exact_cp(x):
    """Exact CP of each x[n] with cp_bound terms: unit vectors on all modes but the largest."""
    b, dims = x.shape[0], list(x.shape[1:])
    big = dims.index(max(dims))
    rest = [d for k, d in enumerate(dims) if k != big]
    fibers = x.movedim(big + 1, -1).reshape(b, -1, dims[big])      # (B, prod rest, d_big)
    idx = torch.unravel_index(torch.arange(fibers.shape[1]), tuple(rest)) if rest else ()
    factors, j = [], 0
    for k, d in enumerate(dims):
        if k == big:
            factors.append(fibers.transpose(1, 2).contiguous())
        else:
            unit = torch.nn.functional.one_hot(idx[j], d).T.to(x.dtype)
            factors.append(unit.expand(b, -1, -1).contiguous())
            j += 1
    return factors


def _cp(x, rank, iters, tol):
    """Rank-`rank` CP of each x[n] (x has no size-1 modes): list of (B, d_k, rank) factors."""
    dims = list(x.shape[1:])
    if rank >= cp_bound(dims):
        factors = _exact_cp(x)
        pad = rank - factors[0].shape[2]
        return [torch.cat([f, f.new_zeros(f.shape[0], f.shape[1], pad)], 2) for f in factors]
    if len(dims) <= 2:
        u, s, vh = torch.linalg.svd(x.reshape(x.shape[0], dims[0], -1), full_matrices=False)
        u, s, vh = u[:, :, :rank], s[:, :rank], vh[:, :rank]
        return [u * s[:, None, :]] + ([vh.transpose(1, 2).contiguous()] if len(dims) == 2 else [])
    return _cp_batched.als(x, rank, iters, tol)[0]


def _balance(factors):
    """Gives every mode of each CP term the same norm (keeps fp32/bf16 factors well scaled)."""
    norms = torch.stack([f.norm(dim=1) for f in factors])        # (modes, B, R)
    tiny = torch.finfo(norms.dtype).tiny   # 1e-300 is 0 in float32
    target = norms.clamp_min(tiny).log().mean(0).exp()
    target = torch.where((norms == 0).any(0), torch.zeros_like(target), target)
    return [f * (target / n.clamp_min(tiny))[:, None, :] for f, n in zip(factors, norms)]


def cp_spatial(a, rank, iters=200, tol=1e-10):
    """CP of every A_n in a (N, T2, S2, kh, kw) -> four factors (N, T2, R), (N, S2, R), (N, kh, R), (N, kw, R)."""
    n, dims = a.shape[0], list(a.shape[1:])
    live = [k for k, d in enumerate(dims) if d > 1]
    if not live:  # all modes have size 1: one scalar term per A_n
        out = [a.new_ones(n, 1, rank) for _ in dims]
        out[0] = out[0] * a.reshape(n, 1, 1)
        return out
    live_factors = iter(_balance(_cp(a.reshape([n] + [dims[k] for k in live]), rank, iters, tol)))
    return [next(live_factors) if k in live else a.new_ones(n, 1, rank) for k in range(len(dims))]


# The decomposition --------------------------------------------------------------

def factorize(weight, split, rank, merged=False, cp_iters=200, cp_tol=1e-10):
    """KCP factors (float64) of a weight for a fixed split and rank (N, R, Q)."""
    shape = tuple(weight.shape)
    cout, cin, kh, kw = shape
    t1, s1 = split
    t2, s2 = cout // t1, cin // s1
    n, r, q = rank
    w = weight.detach().to("cpu", torch.float64)
    u, s, vh = torch.linalg.svd(rearrange(w, t1, s1), full_matrices=False)
    root = s[:n].sqrt()
    b_terms = (u[:, :n] * root).T.reshape(n, t1, s1)
    a_terms = (root[:, None] * vh[:n]).reshape(n, t2, s2, kh, kw)
    bu, bsv, bvh = torch.linalg.svd(b_terms, full_matrices=False)       # batched over n
    broot = bsv[:, :q].sqrt()
    bt = (bu[:, :, :q] * broot[:, None, :]).permute(1, 2, 0)            # (T1, Q, N)
    bs = (broot[:, :, None] * bvh[:, :q]).permute(1, 0, 2)              # (Q, N, S1)
    at, as_, ah, aw = cp_spatial(a_terms, r, cp_iters, cp_tol)
    factors = [bs, as_.transpose(1, 2), ah.transpose(1, 2), aw.transpose(1, 2), at]  # at stays (N, T2, R)
    factors = [f.contiguous() for f in factors]
    if merged:
        return factors[:4] + [KCP.merge(at, bt.contiguous())]
    return factors + [bt.contiguous()]



@single_threaded
def decompose(weight, *, rank=None, ratio=None, macs_ratio=None, split=None, merged=False, stride=1,
              cp_iters=200, cp_tol=1e-10, verify=3):
    """KCP factorization of a conv weight.

    rank:  (N, R, Q) = (KT rank, CP rank of A_n, rank of B_n); needs split unless
           the default (the first of default_splits) is wanted.
    ratio / macs_ratio: targets (dense / factorized parameters, MACs); every
           (split, N, R, Q) on a grid that meets all of them is scored by its
           estimated error, the `verify` best are decomposed and the least
           actual error wins. With ratio alone the layer must also not cost
           more MACs than dense. MACs are per output position, with the 1x1
           stages that run before the strided ones counted stride^2 times.
    split: (T1, S1), or None to try default_splits(Cout, Cin).
    merged: the 5-factor form whose last two stages are one GEMM.
    """
    shape = tuple(weight.shape)
    _check_target("ratio", ratio)
    _check_target("macs_ratio", macs_ratio)
    if rank is None and ratio is None and macs_ratio is None:
        raise ValueError("kcp: give rank=(N, R, Q), or ratio= and/or macs_ratio=")
    if rank is not None:
        split = check_split(shape, split if split is not None else default_splits(*shape[:2])[0])
        rank = check_rank(shape, split, rank)
        factors = factorize(weight, split, rank, merged, cp_iters, cp_tol)
        return _result(weight, factors, split, rank, merged)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    splits = [check_split(shape, split)] if split is not None else default_splits(*shape[:2])
    dense_params = math.prod(shape)
    dense_macs = dense_params  # per output position
    found = []
    for sp in splits:
        for cand in _configs(weight, sp, out_hw=(1, 1), in_hw=(sh, sw), merged=merged):
            if ratio is not None and cand.params * ratio > dense_params:
                continue
            macs_cap = dense_macs / macs_ratio if macs_ratio is not None else dense_macs
            if cand.macs > macs_cap:
                continue
            found.append(cand)
    if not found:
        raise ValueError("kcp: no (split, N, R, Q) for shape %s meets ratio=%s, macs_ratio=%s (splits tried: %s)"
                         % (shape, ratio, macs_ratio, splits))
    found.sort(key=lambda c: (c.rel_err_sq, c.params, c.macs))
    best = None
    for cand in found[:max(1, verify)]:
        sp, rk = cand.config["split"], cand.config["rank"]
        fact = _result(weight, factorize(weight, sp, rk, merged, cp_iters, cp_tol), sp, rk, merged)
        err = fact.relative_error(weight)
        if best is None or err < best[0]:
            best = (err, fact)
    return best[1]


def _result(weight, factors, split, rank, merged):
    shape = tuple(weight.shape)
    factors = [f.to(device=weight.device, dtype=weight.dtype).contiguous() for f in factors]
    meta = {"split": tuple(split), "rank": tuple(rank), "merged": bool(merged)}
    return Factorization("kcp", factors, shape, meta)


# Candidates for rank selection -------------------------------------------------------

def _grid(hi, grid=_GRID):
    return [v for v in grid if v < hi] + ([hi] if hi <= grid[-1] else [])


def _als_errors(x, ranks, iters=8):
    """Relative squared CP errors of a batch of unit-norm tensors x (N, dims...) at each rank: (len(ranks), N).

    A short batched CP-ALS: an estimate used to rank candidates, not the decomposition itself.
    """
    n = x.shape[0]
    dims = [d for d in x.shape[1:] if d > 1]
    x = x.reshape(n, *dims)
    total = x.reshape(n, -1).square().sum(1).clamp_min(1e-30)   # reshape: dims may all be 1 (a 1x1x1x1 weight)
    bases = _cp_batched.unfolding_bases(x) if len(dims) > 2 else None   # shared by all ranks
    out = []
    for rank in ranks:
        if not dims or rank >= cp_bound(dims):
            out.append(torch.zeros(n, dtype=x.dtype))
        elif len(dims) <= 2:
            s = torch.linalg.svdvals(x.reshape(n, dims[0], -1))
            out.append(s[:, rank:].square().sum(1) / total)
        else:
            out.append(_cp_batched.als(x, rank, iters, tol=0.0, ridge=1e-6, bases=bases)[1].square())
    return torch.stack(out).clamp(0, 1)


def _configs(weight, split, out_hw, in_hw=None, merged=False, grid=_GRID):
    """Candidates for one split: every (N, R, Q) on the grid, with estimated errors.

    err(N, R, Q) ~ [sum_{n>=N} s_n^2 + sum_{n<N} s_n^2 (eB + eA - eB eA)] / sum s_n^2,
    eB exact (SVD tail of B_n), eA from a short CP-ALS of A_n; cross terms between
    KT terms are neglected.
    """
    shape = tuple(weight.shape)
    cout, cin, kh, kw = shape
    t1, s1 = split
    n_max, r_max, q_max = bounds(shape, split)
    ns, rs, qs = _grid(n_max, grid), _grid(r_max, grid), _grid(q_max, grid)
    w = weight.detach().to("cpu", torch.float64)
    u, s, vh = torch.linalg.svd(rearrange(w, t1, s1), full_matrices=False)
    energy = s.square()
    total = energy.sum().clamp_min(1e-300)
    tail = energy.flip(0).cumsum(0).flip(0)                    # tail[k] = sum_{n>=k}
    top = ns[-1]
    b_sv = torch.linalg.svdvals(u[:, :top].T.reshape(top, t1, s1)).square()   # unit-norm B_n
    b_err = {qv: b_sv[:, qv:].sum(1) for qv in qs}
    # float32 is plenty for an estimate and halves the cost of the ALS sweeps
    a_err = dict(zip(rs, _als_errors(vh[:top].reshape(top, cout // t1, cin // s1, kh, kw).float(), rs).double()))
    out = []
    for nv in ns:
        e = energy[:nv]
        rest = tail[nv] if nv < len(energy) else torch.zeros((), dtype=torch.float64)
        for rv in rs:
            ea = a_err[rv][:nv]
            for qv in qs:
                eb = b_err[qv][:nv]
                err = ((rest + (e * (ea + eb - ea * eb)).sum()) / total).item()
                params, macs = costs(shape, split, (nv, rv, qv), merged, out_hw, in_hw)
                out.append(Candidate({"split": (t1, s1), "rank": (nv, rv, qv)}, params, macs, err))
    return out


@single_threaded
def candidates(weight, out_hw, in_hw=None, splits=None):
    """KCP configurations (default splits x rank grid) with costs at out_hw.

    in_hw is the layer's input size: the two leading 1x1 stages run there. It
    defaults to out_hw (stride 1). Only the 6-factor form is offered: the merged
    form always costs more.
    """
    shape = tuple(weight.shape)
    splits = [check_split(shape, sp) for sp in splits] if splits is not None else default_splits(*shape[:2])
    out = []
    for sp in splits:
        out.extend(_configs(weight, sp, tuple(out_hw), tuple(in_hw) if in_hw is not None else None, grid=_COARSE))
    return out
