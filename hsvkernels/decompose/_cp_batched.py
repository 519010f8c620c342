"""CP-ALS of a batch of same-shaped tensors, all at one rank, in torch.

KCP fits one CP per Kronecker term: N small tensors (T2, S2, kh, kw) that share a
shape. Fitting them one at a time (tensorly's parafac, as KCP first did) spends
almost all its time in per-call overhead; one ALS batched over the N terms does
every sweep as a few batched einsums and solves. The algorithm is the usual one,
as in cp.py: start from the leading left singular vectors of each mode unfolding
(columns past a mode's size come from a fixed-seed generator), solve each mode's
normal equations with a tiny ridge, normalise columns, and stop a tensor when its
relative error changes by at most `tol` between sweeps (tensorly's rule); the
batch stops when every tensor has.
"""
import torch

_LETTERS = "abcdefgh"


def unfolding_bases(x):
    """Left singular vectors of each mode unfolding of x (B, d_1, ..., d_m): [(B, d_k, min(d_k, rest))]."""
    b = x.shape[0]
    return [torch.linalg.svd(x.movedim(k + 1, 1).reshape(b, d, -1), full_matrices=False)[0]
            for k, d in enumerate(x.shape[1:])]


def initial_factors(bases, rank, seed=0):
    """The first `rank` columns of each basis, padded with seeded unit-norm random columns where it is narrower.

    Every tensor of the batch gets the same padding, so a tensor's fit does not depend on its batch.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for u in bases:
        u = u[:, :, :rank]
        if u.shape[2] < rank:
            extra = torch.randn(u.shape[1], rank - u.shape[2], generator=gen, dtype=u.dtype).to(u.device)
            extra = (extra / extra.norm(dim=0).clamp_min(1e-30)).expand(u.shape[0], -1, -1)
            u = torch.cat([u, extra], 2)
        out.append(u.contiguous())
    return out


class _Mttkrp:
    """x's matricized-tensor times Khatri-Rao products, one mode at a time.

    For mode k the largest other mode is contracted first by a batched GEMM on a
    copy of x laid out for it (made once), which leaves an intermediate
    d_j times smaller than x; the remaining small modes are then summed out.
    Forming the Khatri-Rao product itself would cost prod(other dims) x R per item.
    """

    def __init__(self, x):
        b, dims = x.shape[0], list(x.shape[1:])
        self.plans = []
        for k in range(len(dims)):
            others = sorted((j for j in range(len(dims)) if j != k), key=lambda j: -dims[j])
            first, rest = others[0], others[1:]
            order = [k] + rest + [first]
            laid = x.permute(0, *[o + 1 for o in order]).reshape(b, -1, dims[first]).contiguous()
            self.plans.append((laid, first, rest, [b, dims[k]] + [dims[j] for j in rest]))

    def __call__(self, factors, k):
        laid, first, rest, shape = self.plans[k]
        t = (laid @ factors[first]).reshape(shape + [-1])         # (B, d_k, d_rest..., R)
        for j in rest:  # t's third axis is always the next mode of `rest`
            f = factors[j]
            t = (t * f.reshape(f.shape[0], 1, f.shape[1], *[1] * (t.dim() - 4), f.shape[2])).sum(2)
        return t


def _hadamard_except(grams, k):
    out = None
    for j, g in enumerate(grams):
        if j != k:
            out = g if out is None else out * g
    return out


def reconstruct(factors):
    """sum_r f_1[:, :, r] o ... o f_m[:, :, r] for each batch item: (B, d_1, ..., d_m)."""
    letters = _LETTERS[:len(factors)]
    return torch.einsum("%s->n%s" % (",".join("n%sr" % l for l in letters), letters), *factors)


def als(x, rank, iters=200, tol=1e-10, ridge=1e-12, seed=0, bases=None, relative_tol=False):
    """Rank-`rank` CP-ALS of every tensor in x (B, d_1, ..., d_m), m >= 2, on x's device.

    Returns (factors [(B, d_k, rank)], relative errors (B,), sweeps run). The
    column norms end up in the last factor. `bases` (from unfolding_bases) may be
    passed when several ranks are fitted to the same x. A tensor stops when its
    relative error changes by at most tol (by at most tol x error with relative_tol).
    """
    if x.dim() < 3:
        raise ValueError("cp als needs a batch of tensors with at least 2 modes, got shape %s" % (tuple(x.shape),))
    b, m = x.shape[0], x.dim() - 1
    factors = initial_factors(unfolding_bases(x) if bases is None else bases, rank, seed)
    mttkrp_of = _Mttkrp(x)
    tiny = torch.finfo(x.dtype).tiny   # 1e-300 is 0 in float32: an all-zero block would divide 0 by 0
    norm_sq = x.flatten(1).square().sum(1).clamp_min(tiny)
    eye = torch.eye(rank, dtype=x.dtype, device=x.device)
    weights = x.new_ones(b, rank)
    err = x.new_ones(b)
    previous = x.new_full((b,), float("inf"))
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    grams = [f.transpose(1, 2) @ f for f in factors]
    sweep = 0
    for sweep in range(1, iters + 1):
        keep = active[:, None, None]
        for k in range(m):
            gram = _hadamard_except(grams, k)
            mttkrp = mttkrp_of(factors, k)
            reg = (ridge * gram.diagonal(dim1=1, dim2=2).mean(1)).clamp_min(tiny)   # > 0 once a factor is 0
            a = torch.linalg.solve(gram + reg[:, None, None] * eye, mttkrp.transpose(1, 2)).transpose(1, 2)
            norms = a.norm(dim=1).clamp_min(tiny)
            factors[k] = torch.where(keep, a / norms[:, None, :], factors[k])
            grams[k] = factors[k].transpose(1, 2) @ factors[k]
            weights = torch.where(active[:, None], norms, weights)
        # ||x - model||^2 from the last solve: <x, model> and ||model||^2 need no reconstruction
        last = factors[-1] * weights[:, None, :]
        inner = (mttkrp * last).sum((1, 2))
        model_sq = (gram * (last.transpose(1, 2) @ last)).sum((1, 2))
        e = ((norm_sq - 2 * inner + model_sq).clamp_min(0) / norm_sq).sqrt()
        small = active & (e < 1e-5)
        if small.any():  # the expansion cancels below ~1e-8: measure small errors on the residual itself
            resid = (x - reconstruct(factors[:-1] + [last])).flatten(1).square().sum(1)
            e = torch.where(small, (resid / norm_sq).sqrt(), e)
        err = torch.where(active, e, err)
        threshold = tol * err + 1e-15 if relative_tol else tol
        active = active & ~(((previous - err).abs() <= threshold) | (err < 1e-12))
        previous = err
        if not active.any():
            break
    factors[-1] = factors[-1] * weights[:, None, :]
    return factors, err, sweep
