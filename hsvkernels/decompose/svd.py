"""Truncated SVD of the im2col weight matrix (Denton et al. 2014; Zhang et al. 2015).

W.reshape(Cout, Cin*kh*kw) = U S V^T, truncated to rank r and split as
U sqrt(S) and sqrt(S) V^T, so that both factors have the same scale.
"""
import torch

from ..factorization import Factorization


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


def decompose(weight, *, rank=None, ratio=None):
    shape = tuple(weight.shape)
    cout, cin, kh, kw = shape
    if ratio is not None:
        rank = rank_for_ratio(shape, ratio)
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
