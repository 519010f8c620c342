"""Small float64 linear-algebra helpers shared by the classical decompositions."""
import torch


def fix_signs(u):
    """Flips each column so that its largest-magnitude entry is positive.

    Singular vectors are defined up to sign; fixing it makes factors reproducible
    across LAPACK builds and devices.
    """
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1], device=u.device)])
    signs[signs == 0] = 1
    return u * signs


def leading_left(matrix, r):
    """The top-r left singular vectors (m, r) of `matrix` (m, n), sign-fixed.

    When r exceeds min(m, n) (a Tucker rank larger than what the other modes can
    feed), the extra columns are an orthonormal complement, so the basis stays square.
    """
    u, _, _ = torch.linalg.svd(matrix, full_matrices=r > min(matrix.shape))
    return fix_signs(u[:, :r])


def unfold(tensor, mode):
    """Mode-`mode` unfolding: that mode first, the others flattened in order."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def energy_rank(singular_values, threshold):
    """The smallest r whose leading singular values hold more than `threshold` of the energy.

    The strict '>' follows the official HT-2 code; a threshold the cumulative sum
    never passes (1.0, or rounding) gives the full length.
    """
    energy = singular_values.double().square()
    cumulative = energy.cumsum(0) / energy.sum().clamp_min(1e-300)
    hits = torch.nonzero(cumulative > threshold)
    return int(hits[0].item()) + 1 if hits.numel() else int(singular_values.numel())


def align(rank):
    """Ranks of 16 and above go down to a multiple of 8 (aligned GEMMs), as for svd."""
    return rank - rank % 8 if rank >= 16 else rank
