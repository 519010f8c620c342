"""EVBMF: the analytic rank of empirical variational Bayesian matrix factorization.

Nakajima, Sugiyama, Babacan & Tomioka, "Global analytic solution of fully-observed
variational Bayesian matrix factorization", JMLR 14 (2013); methods.md 5.3. With
the noise variance unknown, it is the minimiser of the EVB free energy over a
bounded interval; the rank is the number of singular values above the EVB
threshold for that variance. Used as a rank source (rank="evbmf") for the
tucker2, tt_tucker and ht2 decompositions, as Kim et al. (2016) did for Tucker-2.
"""
import math
from dataclasses import dataclass

import torch

# tau_lower = TAU_FACTOR * sqrt(alpha): the constant of Nakajima et al. (2013)
TAU_FACTOR = 2.5129


@dataclass(frozen=True)
class EVBMFResult:
    rank: int
    sigma2: float          # the estimated noise variance
    threshold: float       # singular values above this are kept
    shrunk: torch.Tensor   # the EVB estimates of the kept singular values


def _tau(x, alpha):
    """The posterior signal-to-noise ratio for a normalised squared singular value x > x_bar."""
    b = x - (1 + alpha)
    return 0.5 * (b + torch.sqrt(b * b - 4 * alpha))


def _free_energy(sigma2, s2, L, M, H, residual, x_bar, alpha):
    """The EVB objective (up to constants) as a function of the noise variance."""
    x = s2 / (M * sigma2)
    big = x > x_bar
    small_x, big_x = x[~big], x[big]
    tau = _tau(big_x, alpha)
    value = (small_x - torch.log(small_x)).sum()
    value = value + (big_x - tau + torch.log((tau + 1) / big_x) + alpha * torch.log(tau / alpha + 1)).sum()
    return (value + residual / (M * sigma2) + (L - H) * math.log(sigma2)).item()


def _minimise(f, lo, hi, grid=200, iters=100):
    """A bounded 1-D minimisation robust to several local minima: a log-spaced grid,
    then golden-section search between the neighbours of the best grid point."""
    if hi <= lo:
        return lo
    points = torch.logspace(math.log10(lo), math.log10(hi), grid, dtype=torch.float64).tolist()
    values = [f(p) for p in points]
    best = min(range(grid), key=values.__getitem__)
    a, b = points[max(best - 1, 0)], points[min(best + 1, grid - 1)]
    golden = (math.sqrt(5) - 1) / 2
    c, d = b - golden * (b - a), a + golden * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - golden * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + golden * (b - a)
            fd = f(d)
    candidates = [(values[best], points[best]), (fc, c), (fd, d)]
    return min(candidates)[1]


def evbmf_full(matrix):
    """EVBMF of a 2-D matrix: rank, noise variance, threshold and shrunk singular values."""
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise ValueError("evbmf: expected a 2-D tensor, got %s"
                         % (tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__))
    if matrix.numel() == 0:
        raise ValueError("evbmf: the matrix is empty: shape %s" % (tuple(matrix.shape),))
    y = matrix.detach().to(torch.float64)
    if not torch.isfinite(y).all():
        raise ValueError("evbmf: the matrix contains NaN or Inf values")
    if y.shape[0] > y.shape[1]:
        y = y.T  # the analysis needs L <= M
    L, M = y.shape
    # Squared singular values from the small L x L Gram matrix: much cheaper than an
    # SVD of the wide matrix, and accurate enough at the noise level EVBMF looks at.
    s2 = torch.linalg.eigvalsh(y @ y.T).flip(0).clamp_min(0)
    s = s2.sqrt()
    H = s.numel()
    total = y.square().sum().item()
    if total == 0.0:
        return EVBMFResult(0, 0.0, 0.0, s[:0])
    residual = max(total - s2.sum().item(), 0.0)
    alpha = L / M
    tau_lower = TAU_FACTOR * math.sqrt(alpha)
    x_bar = (1 + tau_lower) * (1 + alpha / tau_lower)

    # The noise variance lies between these bounds (Nakajima et al. 2013, sec. 5).
    h_max = min(math.ceil(L / (1 + alpha)) - 1, H)
    upper = (s2.sum().item() + residual) / (L * M)
    lower = max(s2[h_max].item() / (M * x_bar), s2[h_max:].mean().item() / M) if h_max < H else 0.0
    lower = max(lower, upper * 1e-12)  # a noise-free matrix would otherwise put the bound at 0

    def objective(sigma2):
        return _free_energy(sigma2, s2, L, M, H, residual, x_bar, alpha)

    sigma2 = _minimise(objective, lower, upper)
    threshold = math.sqrt(M * sigma2 * x_bar)
    kept = s[s > threshold]
    rank = kept.numel()
    a = 1 - (L + M) * sigma2 / kept.square()
    shrunk = kept / 2 * (a + torch.sqrt((a.square() - 4 * L * M * sigma2 ** 2 / kept ** 4).clamp_min(0)))
    return EVBMFResult(rank, sigma2, threshold, shrunk)


def evbmf(matrix):
    """The EVBMF rank of a 2-D matrix (0 for pure noise; callers floor it where they need >= 1)."""
    return evbmf_full(matrix).rank
