"""HT-2 (Gabor & Zdunek 2023) as the official code computes it (methods.md section 4).

With the kernel permuted to (Cin, kh, Cout, kw): U1 and U3 are the leading left
singular vectors of the Cin- and Cout-unfoldings, computed through a QR of the
unfolding's transpose (the unfoldings are wide; the SVD is then of a small
square factor). The kernel projected on both is matricized (R1*kh) x (R3*kw) and
split by the same QR-SVD at rank R13; the second core takes the rest.

Ranks, in stage order (R1, R13, R3):
  rank=(R1, R13, R3) or an int for all three;
  rank="energy" with energy=e: the official rule, the smallest rank holding more
      than e of the spectral energy of the Cin-unfolding (R1), the Cout-unfolding
      (R3) and the (Cin*kh) x (Cout*kw) matricization of the permuted kernel (R13);
  rank="evbmf": EVBMF of the same three matrices, floored at 1;
  ratio=: proportionally scaled ranks within the parameter budget.
R13 from a rule is capped at min(R1*kh, R3*kw), the most the projected core can hold.
"""
import torch

from .. import formats
from ..evbmf import evbmf
from ..factorization import Factorization
from ._budget import ranks_for_ratio
from ._linalg import energy_rank, fix_signs, unfold
from ._ranks import check_ranks
from .candidates import Candidate

NAMES = ("R1", "R13", "R3")
FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def max_ranks(shape):
    cout, cin, kh, kw = shape
    r1, r3 = min(cin, cout * kh * kw), min(cout, cin * kh * kw)
    return (r1, min(r1 * kh, r3 * kw), r3)


def num_params(shape, ranks):
    cout, cin, kh, kw = shape
    r1, r13, r3 = ranks
    return cin * r1 + kh * r1 * r13 + kw * r13 * r3 + r3 * cout


def left_svd_qr(matrix, r):
    """Top-r left singular vectors of a (wide) matrix via QR of its transpose:
    matrix = R^T Q^T, so its left singular vectors are those of the small R^T."""
    triangular = torch.linalg.qr(matrix.T, mode="r")[1]
    u, s, _ = torch.linalg.svd(triangular.T, full_matrices=False)
    return fix_signs(u[:, :r]), s


def _rule_matrices(w):
    """The three matrices the rank rules look at: Cin-unfolding, (Cin*kh) x (Cout*kw), Cout-unfolding."""
    cout, cin, kh, kw = w.shape
    permuted = w.permute(1, 2, 0, 3)  # (Cin, kh, Cout, kw), the official code's layout
    return unfold(w, 1), permuted.reshape(cin * kh, cout * kw), unfold(w, 0)


def resolve_ranks(w, rank, ratio, energy):
    shape = tuple(w.shape)
    cout, cin, kh, kw = shape
    if energy is not None and rank != "energy":
        raise ValueError("ht2: energy= goes with rank='energy', not rank=%r" % (rank,))
    if ratio is not None:
        r1, r13, r3 = ranks_for_ratio(max_ranks(shape), lambda r: num_params(shape, r), w.numel(), ratio, "ht2")
        return r1, min(r13, r1 * kh, r3 * kw), r3  # rounding can overshoot what the leaves can feed
    if isinstance(rank, str):
        if rank == "energy":
            if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
                raise ValueError("ht2 energy threshold must be a number in (0, 1], got %r" % (energy,))
            r1, r13, r3 = (energy_rank(torch.linalg.svdvals(m), energy) for m in _rule_matrices(w))
        elif rank == "evbmf":
            r1, r13, r3 = (max(1, evbmf(m)) for m in _rule_matrices(w))
        else:
            raise ValueError("ht2 rank rule must be 'energy' or 'evbmf', got %r" % (rank,))
        return r1, min(r13, r1 * kh, r3 * kw), r3
    r1, r13, r3 = check_ranks(rank, NAMES, max_ranks(shape), "ht2", shape)
    if r13 > min(r1 * kh, r3 * kw):
        raise ValueError("ht2 rank R13 must be in [1, min(R1*kh, R3*kw)] = [1, %d] for ranks %s, got %d"
                         % (min(r1 * kh, r3 * kw), (r1, r13, r3), r13))
    return r1, r13, r3


def decompose(weight, *, rank=None, ratio=None, energy=None):
    shape = tuple(weight.shape)
    cout, cin, kh, kw = shape
    w = weight.to(torch.float64)
    if rank == "energy" and energy is None:
        energy = 0.9  # the official code's example threshold
    r1, r13, r3 = resolve_ranks(w, rank, ratio, energy)
    u1, _ = left_svd_qr(unfold(w, 1), r1)
    u3, _ = left_svd_qr(unfold(w, 0), r3)
    projected = torch.einsum("tsij,sa,tc->aicj", w, u1, u3).reshape(r1 * kh, r3 * kw)
    g, _ = left_svd_qr(projected, r13)
    rest = g.T @ projected  # (R13, R3*kw)
    factors = [u1.T, g.reshape(r1, kh, r13).permute(2, 0, 1), rest.reshape(r13, r3, kw).permute(1, 0, 2), u3]
    meta = {"R1": r1, "R13": r13, "R3": r3}
    if rank == "energy":
        meta["energy"] = energy
    return Factorization("ht2", [f.to(weight.dtype).contiguous() for f in factors], shape, meta)


def rank_errors(weight, fractions=FRACTIONS):
    """[((R1, R13, R3), rel_err_sq)] for proportionally scaled ranks, each also with R13 halved.

    The errors are exact: U1, U3 and the R13 split are orthogonal projections, so the
    error is the energy that the leading R13 singular values of the projected
    (R1*kh) x (R3*kw) block leave out; the block of any (R1, R3) is a corner of one
    projection on the full leaf bases.
    """
    shape = tuple(weight.shape)
    cout, cin, kh, kw = shape
    w = weight.detach().to(torch.float64)
    u1 = torch.linalg.svd(unfold(w, 1), full_matrices=False)[0]
    u3 = torch.linalg.svd(unfold(w, 0), full_matrices=False)[0]
    projected = torch.einsum("tsij,sa,tc->aicj", w, u1, u3)
    total = w.square().sum().clamp_min(1e-300)
    seen, out, spectra = set(), [], {}
    for f in fractions:
        r1, r13, r3 = (max(1, round(f * m)) for m in max_ranks(shape))
        cap = min(r1 * kh, r3 * kw)
        for r13_choice in (min(r13, cap), max(1, min(r13, cap) // 2)):
            ranks = (r1, r13_choice, r3)
            if ranks in seen:
                continue
            seen.add(ranks)
            if (r1, r3) not in spectra:
                block = projected[:r1, :, :r3, :].reshape(r1 * kh, r3 * kw)
                spectra[(r1, r3)] = torch.linalg.svdvals(block).square().cumsum(0)
            kept = spectra[(r1, r3)][r13_choice - 1]
            out.append((ranks, max(0.0, 1.0 - (kept / total).item())))
    return out


def stage_shapes(shape, ranks):
    """The factor shapes of an ht2 (or tt_tucker) layer with ranks (R1, R13, R3)."""
    cout, cin, kh, kw = shape
    r1, r13, r3 = ranks
    return [(r1, cin), (r13, r1, kh), (r3, r13, kw), (cout, r3)]


def candidates(weight, out_hw, fractions=FRACTIONS):
    """Candidates with exact errors (see rank_errors); MACs take the input size = out_hw."""
    shape = tuple(weight.shape)
    fmt = formats.get("ht2")
    out = []
    for ranks, err in rank_errors(weight, fractions):
        macs = sum(fmt.stage_macs(stage_shapes(shape, ranks), out_hw, out_hw))
        out.append(Candidate({"rank": ranks}, num_params(shape, ranks), macs, err))
    return out
