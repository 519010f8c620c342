"""Truncated SVD of the im2col weight matrix (Denton et al. 2014; Zhang et al. 2015).

W.reshape(Cout, Cin*kh*kw) = U S V^T, truncated to rank r and split as
U sqrt(S) and sqrt(S) V^T, so that both factors have the same scale.
"""
import torch

from ..factorization import Factorization
from .candidates import Candidate


def max_rank(shape):
    cout, cin, kh, kw = shape
    return min(cout, cin * kh * kw)


def rank_for_ratio(shape, ratio):
    """The largest rank whose parameter count is at most dense / ratio.

    Ranks of 16 and above are rounded down to a multiple of 8, which keeps the
    target met and gives the kernels aligned GEMM sizes.
    """
    cout, cin, kh, kw = shape
    dense = cout * cin * kh * kw
    r = int(dense // (ratio * (cin * kh * kw + cout)))
    r = min(r, max_rank(shape))
    if r < 1:
        raise ValueError("ratio %g is out of reach for shape %s: rank 1 already compresses only %.3gx"
                         % (ratio, tuple(shape), dense / (cin * kh * kw + cout)))
    if r >= 16:
        r -= r % 8
    return r


def decompose(weight, *, rank=None, ratio=None, macs_ratio=None):
    shape = tuple(weight.shape)
    cout, cin, kh, kw = shape
    if ratio is not None or macs_ratio is not None:
        # both stages run at the output resolution, so the MAC reduction equals the compression
        rank = rank_for_ratio(shape, max(ratio or 1, macs_ratio or 1))
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError("svd rank must be an int, got %r" % (rank,))
    if not 1 <= rank <= max_rank(shape):
        raise ValueError("svd rank must be in [1, min(Cout, Cin*kh*kw)] = [1, %d] for shape %s, got %d"
                         % (max_rank(shape), shape, rank))
    w = weight.to(torch.float64).reshape(cout, cin * kh * kw)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    u_fac = (u[:, :rank] * root).to(weight.dtype).contiguous()
    v_fac = (root[:, None] * vh[:rank]).reshape(rank, cin, kh, kw).to(weight.dtype).contiguous()
    energy = (s[:rank].square().sum() / s.square().sum().clamp_min(1e-300)).item()
    return Factorization("svd", [v_fac, u_fac], shape, {"rank": rank, "energy": energy})


def candidate_ranks(shape):
    """Ranks 1..15, then multiples of 8 (aligned GEMMs), up to where the factors stop saving parameters."""
    cout, cin, kh, kw = shape
    top = min(max_rank(shape), (cout * cin * kh * kw) // (cin * kh * kw + cout))
    return [r for r in range(1, top + 1) if r < 16 or r % 8 == 0]


def squared_singular_values(mat):
    """sigma^2 of a matrix, descending, as eigenvalues of its smaller Gram matrix.

    Several times faster than svdvals for the wide im2col matrices; the energies
    it loses are relative to sigma_max^2 * eps, far below what rank choice needs.
    """
    gram = mat @ mat.T if mat.shape[0] <= mat.shape[1] else mat.T @ mat
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def candidates(weight, out_hw, in_hw=None):
    """One Candidate per rank of candidate_ranks, its error the exact SVD tail energy."""
    shape = tuple(weight.shape)
    cout, cin, kh, kw = shape
    energy = squared_singular_values(weight.detach().to("cpu", torch.float64).reshape(cout, cin * kh * kw))
    tail = energy.flip(0).cumsum(0).flip(0).tolist() + [0.0]   # tail[r] = energy lost at rank r
    total = max(tail[0], 1e-300)
    positions = out_hw[0] * out_hw[1]
    per_rank = cin * kh * kw + cout
    return [Candidate({"rank": r}, r * per_rank, r * per_rank * positions, tail[r] / total)
            for r in candidate_ranks(shape)]
