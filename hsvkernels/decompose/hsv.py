"""HSV-2: nearest-Kronecker-product SVD of the im2col weight (Van Loan-Pitsianis; docs/methods.md §2.2).

For a split Cout = T1*T2, Cin = S1*S2 the weight is rearranged so that each
(t1, s1) block becomes one row,
    R(W) = W.view(T1, T2, S1, S2, kh, kw).permute(0, 2, 1, 3, 4, 5).reshape(T1*S1, T2*S2*kh*kw),
and the SVD of R(W) truncated to P terms is the best sum of P Kronecker products
in the Frobenius norm: the error is the energy of the dropped singular values.

Automatic choices (split=None):
* Splits: T2 | Cout and S1 | Cin with T2 <= T1 and S1 <= S2. The speed-up
  1 / (P (1/T1 + 1/(S2 kh kw))) needs large T1 and S2, so the other half of the
  divisor pairs only costs SVDs. This also bounds the SVD count (25 for 512 channels).
* Rank: the largest P meeting every target, rounded down to a multiple of 8 from
  16 up (aligned GEMM sizes). Targets not given default to 1: the layer never
  stores more parameters nor costs more MACs than the dense one.
* Among the (split, P) meeting the targets, the least reconstruction error wins;
  ties go to the larger merged GEMMs.
Fallback: the split (T1, S1, T2, S2) = (Cout, 1, 1, Cin) is plain truncated SVD in
HSV form and is always a candidate, so channel counts that do not factor (a
3-channel stem, a prime width) get the SVD layout instead of an error.

Level 2 (level2=(q1, q2), either may be None): truncated SVDs of the merged B
viewed (P*T2, S2*kh*kw) to rank q1 and of A viewed (T1, S1*P) to rank q2 (§2.3).
level2="auto" (with ratio= / macs_ratio=) chooses the hierarchy too: it tries the
2-level form at the targets and, for milder level-1 targets, the largest q1, q2 or
both that bring the layer back to the targets, and keeps the least measured error.
The 2-level form is always among the candidates, so "auto" is never worse than it.
"""
import math

import torch

from ..factorization import Factorization
from ..formats import FORMATS
from .candidates import Candidate
from .._args import check_target as _check_target


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def split_pool(shape):
    """The (T1, S1, T2, S2) splits tried when none is given; the SVD split comes first."""
    cout, cin = shape[0], shape[1]
    return [(cout // t2, s1, t2, cin // s1)
            for t2 in divisors(cout) if t2 * t2 <= cout
            for s1 in divisors(cin) if s1 * s1 <= cin]


def check_split(shape, split):
    cout, cin = shape[0], shape[1]
    if (not isinstance(split, (tuple, list)) or len(split) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in split)):
        raise ValueError("hsv split must be 4 positive ints (T1, S1, T2, S2), got %r" % (split,))
    t1, s1, t2, s2 = split
    if t1 * t2 != cout or s1 * s2 != cin:
        raise ValueError("hsv split (T1, S1, T2, S2) = %s does not divide the channels of shape %s: "
                         "need T1*T2 = Cout = %d (got %d) and S1*S2 = Cin = %d (got %d)"
                         % (tuple(split), tuple(shape), cout, t1 * t2, cin, s1 * s2))
    return tuple(split)


def max_rank(shape, split):
    t1, s1, t2, s2 = split
    return min(t1 * s1, t2 * s2 * shape[2] * shape[3])


def params(shape, split, rank):
    t1, s1, t2, s2 = split
    return rank * (t1 * s1 + t2 * s2 * shape[2] * shape[3])


def macs_per_position(shape, split, rank):
    """Stage 1 costs P*T2*Cin*kh*kw, stage 2 P*Cout*S1 (methods.md §2.2)."""
    cout, cin, kh, kw = shape
    t1, s1, t2, s2 = split
    return rank * (t2 * cin * kh * kw + cout * s1)


def rearrange(weight, split):
    """R(W) in float64: rows (t1, s1), columns (t2, s2, i, j)."""
    _, _, kh, kw = weight.shape
    t1, s1, t2, s2 = split
    w = weight.to(torch.float64).reshape(t1, t2, s1, s2, kh, kw)
    return w.permute(0, 2, 1, 3, 4, 5).reshape(t1 * s1, t2 * s2 * kh * kw)


def energies(weight, split):
    """Squared singular values of R(W), largest first (from the smaller Gram matrix: cheap)."""
    r = rearrange(weight, split)
    gram = r @ r.T if r.shape[0] <= r.shape[1] else r.T @ r
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).cpu()


def tail_fractions(sq):
    """rel_err_sq for every P = 0..len(sq): the energy beyond the first P terms over the total."""
    total = sq.sum().item()
    kept = torch.cat([sq.new_zeros(1), sq.cumsum(0)])
    return ((total - kept) / total).clamp_min(0).tolist() if total > 0 else [0.0] * (len(sq) + 1)


def largest_rank(shape, split, ratio, macs_ratio):
    """The largest P with params <= dense/ratio and MACs <= dense/macs_ratio (0 if none)."""
    dense = math.prod(shape)
    p = min(max_rank(shape, split),
            int(dense // (ratio * params(shape, split, 1))),
            int(dense // (macs_ratio * macs_per_position(shape, split, 1))))
    if p >= 16:
        p -= p % 8
    return max(p, 0)


def gemm_size(shape, split, rank):
    """The smallest dimension of the merged conv/GEMM pair (larger keeps tensor cores busy)."""
    t1, s1, t2, s2 = split
    return min(rank * t2, s2 * shape[2] * shape[3], t1, s1 * rank)


def choose(weight, rank, ratio, macs_ratio, splits, automatic, tails=None):
    """The (split, rank) with the least error among those meeting the targets.

    tails: an optional dict split -> tail_fractions, filled and reused across calls.
    """
    tails = {} if tails is None else tails
    shape = tuple(weight.shape)
    best = None
    for split in splits:
        p = rank if rank is not None else largest_rank(shape, split, ratio, macs_ratio)
        if p < 1 or p > max_rank(shape, split):
            continue
        if rank is not None and automatic and (params(shape, split, p) > math.prod(shape)
                                               or macs_per_position(shape, split, p) > math.prod(shape)):
            continue  # an automatic split must not cost more than dense
        if split not in tails:
            tails[split] = tail_fractions(energies(weight, split))
        err = tails[split][p]
        key = (err, -gemm_size(shape, split, p))
        if best is None or key < best[0]:
            best = (key, split, p)
    return None if best is None else (best[1], best[2], best[0][0])


def _check_rank(shape, split, rank):
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError("hsv rank must be an int (the number of Kronecker terms P), got %r" % (rank,))
    bound = max_rank(shape, split)
    if not 1 <= rank <= bound:
        raise ValueError("hsv rank P must be in [1, min(T1*S1, T2*S2*kh*kw)] = [1, %d] for split %s of shape %s, "
                         "got %d" % (bound, split, shape, rank))



def _level2_ranks(level2, shape, split, rank):
    if level2 is None:
        return None
    if not isinstance(level2, (tuple, list)) or len(level2) != 2:
        raise ValueError("hsv level2 must be a pair (q1, q2), each an int or None, got %r" % (level2,))
    t1, s1, t2, s2 = split
    bounds = (("q1", min(rank * t2, s2 * shape[2] * shape[3]), "min(P*T2, S2*kh*kw)"),
              ("q2", min(t1, s1 * rank), "min(T1, S1*P)"))
    for q, (name, bound, formula) in zip(level2, bounds):
        if q is None:
            continue
        if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= bound:
            raise ValueError("hsv level2 %s must be None or an int in [1, %s] = [1, %d] for split %s and P = %d, "
                             "got %r" % (name, formula, bound, split, rank, q))
    return None if level2[0] is None and level2[1] is None else tuple(level2)


def _truncated(matrix, q):
    """(left, right) with left @ right the best rank-q approximation, scaled evenly.

    The top singular subspace comes from the eigenvectors of the smaller Gram
    matrix, and the other side is a projection onto it (no division by small
    singular values, so it stays exact at full rank). This is several times faster
    than a full SVD of R(W) for the wide and tall shapes splits produce.
    """
    if matrix.shape[0] <= matrix.shape[1]:
        left = torch.linalg.eigh(matrix @ matrix.T).eigenvectors[:, -q:].flip(1)
        right = left.T @ matrix
        sigma = right.norm(dim=1)
    else:
        right = torch.linalg.eigh(matrix.T @ matrix).eigenvectors[:, -q:].flip(1).T
        left = matrix @ right.T
        sigma = left.norm(dim=0)
    root = sigma.sqrt()
    scale = torch.where(root > 0, root, torch.ones_like(root))  # a zero term stays zero
    if matrix.shape[0] <= matrix.shape[1]:
        return left * scale, right / scale[:, None]
    return left / scale, right * scale[:, None]


def factors_for(weight, split, rank, level2=(None, None)):
    """The hsv factor list (float64) for an explicit split, rank and level-2 ranks."""
    _, _, kh, kw = weight.shape
    t1, s1, t2, s2 = split
    left, right = _truncated(rearrange(weight, split), rank)
    a = left.reshape(t1, s1, rank)
    b = right.reshape(rank, t2, s2, kh, kw)
    q1, q2 = level2
    out = [b]
    if q1 is not None:
        b2, b1 = _truncated(b.reshape(rank * t2, s2 * kh * kw), q1)
        out = [b1.reshape(q1, s2, kh, kw), b2.reshape(rank, t2, q1)]
    if q2 is None:
        out.append(a)
    else:
        a2, a1 = _truncated(a.reshape(t1, s1 * rank), q2)
        out += [a1.reshape(q2, s1, rank), a2]
    return out


def level2_shapes(shape, split, rank, level2):
    """Factor shapes of the (possibly level-2) hsv layout, without computing any factor."""
    _, _, kh, kw = shape
    t1, s1, t2, s2 = split
    q1, q2 = level2
    out = [(rank, t2, s2, kh, kw)] if q1 is None else [(q1, s2, kh, kw), (rank, t2, q1)]
    out += [(t1, s1, rank)] if q2 is None else [(q2, s1, rank), (t1, q2)]
    return out


def _level2_costs(shape, split, rank, level2):
    """(params, MACs per output position) of a level-2 layout, from the format's own formulas."""
    fmt = FORMATS["hsv"]
    shapes = level2_shapes(shape, split, rank, level2)
    return fmt.num_params(shapes), sum(fmt.stage_macs(shapes, (1, 1), (1, 1)))


def _largest_level2(shape, split, rank, which, ratio, macs_ratio):
    """The largest level-2 rank(s) meeting the targets: q1, q2 or both at one common fraction of their bounds."""
    t1, s1, t2, s2 = split
    bounds = (min(rank * t2, s2 * shape[2] * shape[3]), min(t1, s1 * rank))
    dense = math.prod(shape)

    def at(f):  # level-2 ranks at fraction f of their bounds
        q = [max(1, int(b * f)) for b in bounds]
        return (q[0] if which in ("q1", "both") else None, q[1] if which in ("q2", "both") else None)

    def fits(level2):
        n_params, n_macs = _level2_costs(shape, split, rank, level2)
        return n_params * ratio <= dense and n_macs * macs_ratio <= dense

    steps = 64  # costs grow with f, so a bisection over f finds the largest fitting ranks
    lo, hi = 0, steps
    if not fits(at(1.0 / steps)):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(at(mid / steps)):
            lo = mid
        else:
            hi = mid - 1
    return at(max(lo, 1) / steps)


MILDER = (1.25, 1.5, 2.0, 3.0)  # how much looser the level-1 targets are before level 2 closes the gap


def choose_hierarchical(weight, ratio, macs_ratio, splits):
    """(split, P, level2, rel_err_sq, factors) with the least error among 2-level and level-2 layouts.

    factors are the float64 factors when they were built to measure the error, else None
    (the 2-level form's error comes from its singular values alone).
    """
    shape = tuple(weight.shape)
    w = weight.to(torch.float64)
    tried, tails = {}, {}  # (split, P, level2) -> (rel_err_sq, factors or None)
    plain = choose(weight, None, ratio, macs_ratio, splits, automatic=True, tails=tails)
    if plain is not None:
        tried[(plain[0], plain[1], (None, None))] = (plain[2], None)
    bases = set()
    for m in MILDER:
        # Loosen the level-1 targets, the MAC one below 1 too (level 2 must then win the MACs back).
        for macs_target in (max(macs_ratio / m, 1.0), macs_ratio / m):
            base = choose(weight, None, ratio / m, macs_target, splits, automatic=True, tails=tails)
            if base is not None:
                bases.add(base[:2])
    for split, p in sorted(bases):
        for which in ("q1", "q2", "both"):
            level2 = _largest_level2(shape, split, p, which, ratio, macs_ratio)
            if level2 is not None and (split, p, level2) not in tried:
                factors = factors_for(weight, split, p, level2)
                w_hat = Factorization("hsv", factors, shape).to_dense()
                tried[(split, p, level2)] = (((w - w_hat).norm() / w.norm().clamp_min(1e-300)).item() ** 2, factors)
    if not tried:
        return None
    (split, p, level2), (err, factors) = min(tried.items(), key=lambda kv: kv[1][0])
    return split, p, level2, err, factors


def decompose(weight, *, rank=None, ratio=None, macs_ratio=None, split=None, level2=None):
    """HSV factors of a conv weight; see the module docstring for the automatic choices.

    rank: P, the number of Kronecker terms. ratio / macs_ratio: parameter / MAC
    reduction targets (dense over factorized, >= 1). split: (T1, S1, T2, S2).
    level2: (q1, q2), optional level-2 ranks of the merged B and A, or "auto"
        (needs ratio= and/or macs_ratio=) to choose them, or none, by measured error.
    """
    shape = tuple(weight.shape)
    _check_target("ratio", ratio)
    _check_target("macs_ratio", macs_ratio)
    if isinstance(level2, str):
        if level2 != "auto":
            raise ValueError("hsv level2 must be None, (q1, q2) or 'auto', got %r" % (level2,))
        if rank is not None or (ratio is None and macs_ratio is None):
            raise ValueError("hsv level2='auto' chooses the ranks from targets: give ratio= and/or macs_ratio=, "
                             "not rank=")
        return _decompose_hierarchical(weight, ratio, macs_ratio, split)
    if rank is not None and (ratio is not None or macs_ratio is not None):
        raise ValueError("hsv: give rank= or targets (ratio=, macs_ratio=), not both")
    if rank is None and ratio is None and macs_ratio is None:
        raise ValueError("hsv: give rank=, ratio= or macs_ratio=")
    splits = [check_split(shape, split)] if split is not None else split_pool(shape)
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError("hsv rank must be an int (the number of Kronecker terms P), got %r" % (rank,))
        if split is None:
            rank_bounds = [max_rank(shape, s) for s in splits]
            if rank > max(rank_bounds) or rank < 1:
                raise ValueError("hsv rank P = %d is not in [1, min(T1*S1, T2*S2*kh*kw)] for any split of shape %s "
                                 "(largest bound %d)" % (rank, shape, max(rank_bounds)))
        else:
            _check_rank(shape, splits[0], rank)
    picked = choose(weight, rank, ratio or 1, macs_ratio or 1, splits, automatic=split is None)
    if picked is None and rank is not None and split is None:
        _check_rank(shape, splits[0], rank)  # no split is cheaper than dense at this rank: plain SVD layout
        picked = (splits[0], rank, tail_fractions(energies(weight, splits[0]))[rank])
    if picked is None:
        where = "split %s" % (splits[0],) if split is not None else "any split"
        raise ValueError("hsv: ratio=%s, macs_ratio=%s is out of reach for shape %s with %s "
                         "(even P = 1 costs more, or costs more MACs than dense)" % (ratio, macs_ratio, shape, where))
    chosen, p, err = picked
    q = _level2_ranks(level2, shape, chosen, p)
    fs = factors_for(weight, chosen, p, q or (None, None))
    fact = Factorization("hsv", [f.to(weight.dtype).contiguous() for f in fs], shape)
    targets = ratio is not None or macs_ratio is not None
    if q is not None and targets and (fact.num_params() * (ratio or 1) > math.prod(shape)
                                      or fact.macs(1, 1) * (macs_ratio or 1) > math.prod(shape)):
        raise ValueError("hsv level2 %s misses the targets ratio=%s, macs_ratio=%s at split %s, P = %d: "
                         "lower q1/q2" % (q, ratio, macs_ratio, chosen, p))
    fact.meta.update({"split": chosen, "rank": p, "level2": q,
                      "energy": 1.0 - err,
                      "svd_layout": chosen[1] == 1 and chosen[2] == 1})
    return fact


def _decompose_hierarchical(weight, ratio, macs_ratio, split):
    shape = tuple(weight.shape)
    splits = [check_split(shape, split)] if split is not None else split_pool(shape)
    picked = choose_hierarchical(weight, ratio or 1, macs_ratio or 1, splits)
    if picked is None:
        raise ValueError("hsv: ratio=%s, macs_ratio=%s is out of reach for shape %s, with or without level-2 "
                         "ranks" % (ratio, macs_ratio, shape))
    chosen, p, level2, err, factors = picked
    if factors is None:
        factors = factors_for(weight, chosen, p, level2)
    fact = Factorization("hsv", [f.to(weight.dtype).contiguous() for f in factors], shape)
    q = None if level2 == (None, None) else level2
    fact.meta.update({"split": chosen, "rank": p, "level2": q, "energy": 1.0 - err,
                      "svd_layout": chosen[1] == 1 and chosen[2] == 1})
    return fact


def candidates(weight, out_hw):
    """Every (split, P) of the pool no costlier than dense, with costs at out_hw and its energy loss."""
    shape = tuple(weight.shape)
    dense = math.prod(shape)
    positions = out_hw[0] * out_hw[1]
    out = []
    with torch.no_grad():
        for split in split_pool(shape):
            fractions = tail_fractions(energies(weight.detach(), split))
            for p in range(1, max_rank(shape, split) + 1):
                n_params, n_macs = params(shape, split, p), macs_per_position(shape, split, p)
                if n_params > dense or n_macs > dense:
                    break  # both costs grow with P
                out.append(Candidate({"split": split, "rank": p}, n_params, n_macs * positions, fractions[p]))
    return out
