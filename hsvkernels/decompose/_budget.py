"""ratio= for multi-rank formats: one scale applied to every rank, the largest that fits.

Scaling all ranks by the same fraction of their maxima keeps the shape of a
full-rank factorization and is a single 1-D search, which is how ratio= is meant:
a parameter budget, not a rank-selection method (see hsvkernels.ranks for that).
"""
from ._linalg import align

# Aligned ranks are kept only while they give up at most this share of the parameters.
ALIGN_SLACK = 0.1


def ranks_for_ratio(max_ranks, params, dense, ratio, method):
    """Largest proportionally scaled ranks with params(ranks) <= dense / ratio.

    max_ranks: the per-rank upper bounds; params: ranks -> parameter count.
    Ranks of 16 and above are then aligned down to multiples of 8 (aligned GEMMs)
    unless that drops more than ALIGN_SLACK of the parameters: with few channels
    the multiples of 8 are coarse, and methods compared at one ratio should land
    near it. Either way the budget holds, since params grows with every rank.
    """
    budget = dense / ratio
    top = max(max_ranks)
    for k in range(top, 0, -1):
        ranks = tuple(max(1, min(m, round(k * m / top))) for m in max_ranks)
        if params(ranks) <= budget:
            aligned = tuple(align(r) for r in ranks)
            return aligned if params(aligned) >= (1 - ALIGN_SLACK) * params(ranks) else ranks
    ones = tuple(1 for _ in max_ranks)
    raise ValueError("%s: ratio %g is out of reach: ranks %s already compress only %.3gx"
                     % (method, ratio, ones, dense / params(ones)))
