"""kind "kcp": layout, merged form, decomposition (exactness, recovery, targets) and argument errors."""
import pytest
import torch
import torch.nn.functional as F
from factories import CASES
from test_op import SHAPES, TOL, _relative_max_error

import hsvkernels
from hsvkernels import Factorization, reference
from hsvkernels.decompose import kcp
from hsvkernels.formats.kcp import KCP


def _random_kcp(shape, split, rank, merged=False, dtype=torch.float64):
    return Factorization("kcp", [torch.randn(s, dtype=dtype) for s in kcp.factor_shapes(shape, split, rank, merged)],
                         shape)


def test_to_dense_is_the_kronecker_cp_sum():
    shape, split, (n_, r_, q_) = (6, 8, 3, 5), (3, 2), (2, 3, 2)
    bs, as_, ah, aw, at, bt = _random_kcp(shape, split, (n_, r_, q_)).factors
    t1, s1 = split
    t2, s2 = 6 // t1, 8 // s1
    w = torch.zeros(t1, t2, s1, s2, 3, 5, dtype=torch.float64)
    for n in range(n_):
        b = sum(torch.outer(bt[:, q, n], bs[q, n]) for q in range(q_))
        a = sum(torch.einsum("a,b,c,d->abcd", at[n, :, r], as_[n, r], ah[n, r], aw[n, r]) for r in range(r_))
        w += torch.einsum("ac,bdij->abcdij", b, a)     # (t1, t2, s1, s2): t = t1*T2 + t2, s = s1*S2 + s2
    dense = KCP().to_dense([bs, as_, ah, aw, at, bt])
    assert (dense - w.reshape(6, 8, 3, 5)).abs().max() < 1e-12
    merged = KCP().to_dense([bs, as_, ah, aw, KCP.merge(at, bt)])
    assert (merged - dense).abs().max() < 1e-12


@pytest.mark.parametrize("spec", [SHAPES[i] for i in (0, 1, 3, 4, 6, 7, 9, 10, 11)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_merged_form_matches_dense(spec, dtype):
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
    shape = (cout, cin, kh, kw)
    split = kcp.default_splits(cout, cin)[0]
    fact = _random_kcp(shape, split, (2, 2, 1), merged=True)
    assert len(fact.factors) == 5
    x = torch.randn(n, cin, h, w, dtype=torch.float64)
    truth = F.conv2d(x, fact.to_dense(), None, stride, padding, dilation)
    fd, xd = fact.to(dtype), x.to(dtype)
    y = hsvkernels.conv2d(xd, fd, None, stride, padding, dilation)
    assert y.shape == truth.shape
    assert _relative_max_error(y, truth) <= TOL[dtype]
    assert _relative_max_error(reference.conv2d(xd, fd, None, stride, padding, dilation), truth) <= TOL[dtype]


def test_merged_form_gradcheck_and_opcheck():
    fact = _random_kcp((6, 4, 3, 3), (2, 2), (2, 2, 2), merged=True)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    factors = [f.clone().requires_grad_() for f in fact.factors]

    def fn(x, *fs):
        return torch.ops.hsv.conv2d(x, list(fs), None, [2, 1], [1, 1], [1, 2], 1, "kcp")

    assert torch.autograd.gradcheck(fn, (x, *factors), eps=1e-6, atol=1e-7)
    f32 = [f.detach().float() for f in fact.factors]
    torch.library.opcheck(torch.ops.hsv.conv2d.default,
                          (torch.randn(2, 4, 6, 7), f32, torch.randn(6), [2, 1], [1, 1], [1, 2], 1, "kcp"))


def test_stage_macs_count_the_input_resolution_stages():
    fact = _random_kcp((8, 8, 3, 3), (2, 2), (2, 3, 2), dtype=torch.float32)
    x = torch.randn(2, 8, 10, 12)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        y = hsvkernels.conv2d(x, fact, None, 2, 1)
    assert counter.get_total_flops() == 2 * 2 * fact.macs(y.shape[2], y.shape[3], 10, 12)
    assert fact.num_params() == 2 * (3 * (4 + 4 + 3 + 3) + 2 * (2 + 2))   # N [R (T2+S2+kh+kw) + Q (T1+S1)]


# Argument and shape errors -------------------------------------------------------------

def _factors(shape=(8, 8, 3, 3), split=(2, 2), rank=(2, 3, 2), merged=False):
    return [torch.randn(s) for s in kcp.factor_shapes(shape, split, rank, merged)]


@pytest.mark.parametrize("path", ["op", "reference"])
def test_bad_factor_shapes_give_clear_errors(path):
    run = torch.ops.hsv.conv2d if path == "op" else reference.conv2d_factors
    x = torch.randn(1, 8, 5, 5)
    good = _factors()
    cases = [
        (good[:4], "expected 6 factors"),
        (good[:2] + [torch.randn(3, 3, 3)] + good[3:], r"factors\[2\] \(ah"),
        (good[:4] + [torch.randn(2, 4, 4)] + good[5:], r"factors\[4\] \(at"),
        (good[:5] + [torch.randn(2, 3, 2)], r"factors\[5\] \(bt"),
        (good[:4] + [torch.randn(8, 2, 2)], r"must be 4-D"),
        ([torch.randn(2, 2, 3)] + good[1:], "Cin = S1\\*S2|channels but the factors expect"),
    ]
    for factors, message in cases:
        with pytest.raises(ValueError, match=message):
            run(x, factors, None, [1, 1], [1, 1], [1, 1], 1, "kcp")


def test_decompose_argument_errors():
    w = torch.randn(8, 6, 3, 3)
    with pytest.raises(ValueError, match="must divide"):
        hsvkernels.decompose(w, "kcp", rank=(1, 1, 1), split=(3, 2))
    with pytest.raises(ValueError, match=r"R \(CP rank\) must be in \[1, "):
        hsvkernels.decompose(w, "kcp", rank=(1, 10 ** 4, 1), split=(2, 2))
    with pytest.raises(ValueError, match=r"N \(KT rank\) must be in"):
        hsvkernels.decompose(w, "kcp", rank=(10 ** 4, 1, 1), split=(2, 2))
    with pytest.raises(ValueError, match=r"Q \(channel rank\) must be in"):
        hsvkernels.decompose(w, "kcp", rank=(1, 1, 3), split=(2, 2))
    with pytest.raises(ValueError, match="triple"):
        hsvkernels.decompose(w, "kcp", rank=4, split=(2, 2))
    with pytest.raises(ValueError, match=">= 1"):
        hsvkernels.decompose(w, "kcp", ratio=0.5)
    with pytest.raises(ValueError, match=">= 1"):
        hsvkernels.decompose(w, "kcp", macs_ratio=0.9)
    with pytest.raises(ValueError, match="no \\(split, N, R, Q\\)"):
        hsvkernels.decompose(w, "kcp", ratio=10 ** 6)


# Decomposition -------------------------------------------------------------------------

@pytest.mark.parametrize("shape,split", [((16, 8, 3, 3), (4, 2)), ((16, 8, 3, 3), (1, 1)), ((16, 8, 3, 3), (16, 8)),
                                         ((12, 16, 1, 1), (3, 4)), ((8, 8, 5, 3), (2, 4)), ((7, 3, 3, 3), (7, 1))])
@pytest.mark.parametrize("merged", [False, True])
def test_full_rank_is_exact(shape, split, merged):
    w = torch.randn(shape, dtype=torch.float64)
    fact = hsvkernels.decompose(w, "kcp", rank=kcp.bounds(shape, split), split=split, merged=merged)
    assert fact.relative_error(w) < 1e-12
    x = torch.randn(2, shape[1], 9, 8, dtype=torch.float64)
    y = hsvkernels.conv2d(x, fact, None, 2, 1, (2, 1))
    assert (y - F.conv2d(x, w, None, 2, 1, (2, 1))).abs().max() < 1e-10


def _synthetic(shape, split, rank):
    """A KCP kernel whose KT terms are orthogonal on both sides (B_n and A_n on disjoint output rows) with
    distinct norms, so that the Kronecker SVD returns the terms themselves: the identifiable case."""
    cout, cin, kh, kw = shape
    t1, s1 = split
    n_, r_, q_ = rank
    bs, as_, ah, aw, at, bt = [torch.randn(s, dtype=torch.float64) for s in kcp.factor_shapes(shape, split, rank)]
    rows = t1 // n_
    mask = torch.zeros(t1, 1, n_, dtype=torch.float64)
    for n in range(n_):
        mask[n * rows:(n + 1) * rows, :, n] = 1.0
    bt = bt * mask * torch.tensor([3.0 ** -n for n in range(n_)], dtype=torch.float64)
    rows2 = (cout // t1) // n_
    mask2 = torch.zeros(n_, cout // t1, 1, dtype=torch.float64)
    for n in range(n_):
        mask2[n, n * rows2:(n + 1) * rows2] = 1.0
    at = at * mask2
    return KCP().to_dense([bs, as_, ah, aw, at, bt])


@pytest.mark.parametrize("shape,split,rank", [((8, 8, 3, 3), (2, 2), (1, 3, 2)),
                                              ((12, 8, 3, 3), (4, 2), (2, 2, 1)),
                                              ((16, 16, 3, 3), (4, 4), (2, 3, 2)),
                                              ((16, 16, 1, 1), (4, 4), (2, 2, 2))])
def test_recovers_synthetic_kcp_kernels(shape, split, rank):
    w = _synthetic(shape, split, rank)
    fact = hsvkernels.decompose(w, "kcp", rank=rank, split=split, cp_iters=3000, cp_tol=1e-15)
    assert fact.relative_error(w) < 1e-7
    assert fact.meta["rank"] == rank


def test_error_is_monotone_in_each_rank():
    torch.manual_seed(1)
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    split = (2, 2)
    n_max, r_max, q_max = kcp.bounds(w.shape, split)

    def err(rank):
        return hsvkernels.decompose(w, "kcp", rank=rank, split=split).relative_error(w)

    by_n = [err((n, r_max, q_max)) for n in (1, 2, 3, 4)]
    by_q = [err((4, r_max, q)) for q in (1, 2)]
    by_r = [err((1, r, q_max)) for r in (1, 2, 4, 8, r_max)]
    for seq in (by_n, by_q, by_r):
        assert all(b <= a + 1e-9 for a, b in zip(seq, seq[1:])), seq
    assert by_n[-1] < 1e-12


def test_targets_are_met_and_least_error_wins():
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    dense = w.numel()
    only_ratio = hsvkernels.decompose(w, "kcp", ratio=4, verify=1)
    assert only_ratio.compression() >= 4
    assert only_ratio.macs(8, 8) <= dense * 64                     # never more MACs than dense
    by_macs = hsvkernels.decompose(w, "kcp", macs_ratio=3, verify=1)
    assert by_macs.macs(8, 8) * 3 <= dense * 64
    both = hsvkernels.decompose(w, "kcp", ratio=3, macs_ratio=2, split=(4, 2), verify=1)
    assert both.compression() >= 3 and both.macs(8, 8) * 2 <= dense * 64 and both.meta["split"] == (4, 2)
    # the error estimate picks configurations, the actual error decides among the verified ones
    picked = hsvkernels.decompose(w, "kcp", ratio=4, verify=3)
    assert picked.relative_error(w) <= only_ratio.relative_error(w) + 1e-12


def test_channels_that_do_not_factor_fall_back():
    w = torch.randn(7, 3, 3, 3, dtype=torch.float64)              # prime Cout, the 3-channel stem
    assert kcp.default_splits(7, 3) == [(1, 1), (1, 3), (7, 1), (7, 3)]
    fact = hsvkernels.decompose(w, "kcp", ratio=1.5)
    assert fact.compression() >= 1.5 and fact.relative_error(w) < 1


def test_deterministic():
    w = torch.randn(8, 8, 3, 3)
    a = hsvkernels.decompose(w, "kcp", ratio=3, verify=2)
    b = hsvkernels.decompose(w, "kcp", ratio=3, verify=2)
    assert a.meta == b.meta and all(torch.equal(x, y) for x, y in zip(a.factors, b.factors))
    ca = kcp.candidates(w, (8, 8))
    cb = kcp.candidates(w, (8, 8))
    assert ca == cb


def test_candidate_costs_match_the_factorization():
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    cands = kcp.candidates(w, (5, 6), in_hw=(10, 12))
    assert len({tuple(sorted(c.config.items())) for c in cands}) == len(cands)
    for cand in cands[:: max(1, len(cands) // 7)]:
        fact = hsvkernels.decompose(w, "kcp", **cand.config)
        assert fact.num_params() == cand.params
        assert fact.macs(5, 6, 10, 12) == cand.macs
        assert 0.0 <= cand.rel_err_sq <= 1.0
    # estimates follow the actual errors at least at the ends
    full = [c for c in cands if c.config["rank"] == kcp.bounds(w.shape, c.config["split"])]
    assert all(c.rel_err_sq < 1e-12 for c in full)


def test_kind_case_full_rank_matches_factories():
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    assert CASES["kcp"].full_rank(w).relative_error(w) < 1e-12


def test_from_conv_passes_the_stride_so_strided_layers_stay_under_dense_macs():
    import hsvkernels

    conv = torch.nn.Conv2d(64, 128, 3, stride=2, padding=1)
    layer = hsvkernels.FactorizedConv2d.from_conv(conv, method="kcp", ratio=2)
    out_hw, in_hw = (8, 8), (16, 16)
    assert layer.macs(*out_hw, *in_hw) <= layer.factorization.dense_macs(*out_hw)
