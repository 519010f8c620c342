"""ratio= for multi-rank formats: one scale applied to every rank, the largest that fits.

Scaling all ranks by the same fraction of their maxima keeps the shape of a
full-rank factorization and is a single 1-D search, which is how ratio= is meant:
a parameter budget, not a rank-selection method (see hsvkernels.ranks for that).
"""
from ._linalg import align


def ranks_for_ratio(max_ranks, params, dense, ratio, method):
    """Largest proportionally scaled ranks with params(ranks) <= dense / ratio.

    max_ranks: the per-rank upper bounds; params: ranks -> parameter count.
    Ranks of 16 and above are then aligned down to multiples of 8 (still in budget,
    since params grows with every rank).
    """
    budget = dense / ratio
    top = max(max_ranks)
    for k in range(top, 0, -1):
        ranks = tuple(max(1, min(m, round(k * m / top))) for m in max_ranks)
        if params(ranks) <= budget:
            return tuple(align(r) for r in ranks)
    ones = tuple(1 for _ in max_ranks)
    raise ValueError("%s: ratio %g is out of reach: ranks %s already compress only %.3gx"
                     % (method, ratio, ones, dense / params(ones)))
