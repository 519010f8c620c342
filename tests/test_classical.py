"""The classical baselines: tucker2, cp, ht2, tt_tucker decompositions and EVBMF."""
import pytest
import torch
import torch.nn.functional as F
from factories import CASES, assert_flops_match_macs

import hsvkernels
from hsvkernels.decompose import cp, ht2, tt_tucker, tucker2
from hsvkernels.evbmf import evbmf, evbmf_full

KINDS = ["tucker2", "cp", "ht2", "tt_tucker"]
MAX_RANK = {"tucker2": tucker2.max_ranks, "cp": cp.max_rank, "ht2": ht2.max_ranks, "tt_tucker": tt_tucker.max_ranks}


# Small eigenproblems: extra OpenMP threads only add contention (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _rel(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


# Synthetic recovery: a kernel built in a format is found again by its decomposition -----

def test_tucker2_recovers_a_tucker2_kernel():
    g = _gen(1)
    w = torch.einsum("tc,cdij,sd->tsij", _randn(g, 10, 3), _randn(g, 3, 2, 3, 3), _randn(g, 6, 2))
    for iters in (0, 3):
        fact = hsvkernels.decompose(w, "tucker2", rank=(3, 2), iters=iters)
        assert [tuple(f.shape) for f in fact.factors] == [(2, 6), (3, 2, 3, 3), (10, 3)]
        assert fact.relative_error(w) < 1e-12


def test_separable_kinds_recover_their_kernels():
    g = _gen(2)
    ranks = (3, 4, 5)  # (R1, R13, R3), TT in mode order (Cin, kh, kw, Cout)
    u1, g1, g2, u3 = _randn(g, 3, 8), _randn(g, 4, 3, 3), _randn(g, 5, 4, 2), _randn(g, 10, 5)
    w = torch.einsum("tc,cbj,bai,as->tsij", u3, g2, g1, u1)  # (10, 8, 3, 2)
    fact = hsvkernels.decompose(w, "ht2", rank=ranks)
    assert [tuple(f.shape) for f in fact.factors] == [(3, 8), (4, 3, 3), (5, 4, 2), (10, 5)]
    assert fact.relative_error(w) < 1e-12
    fact = hsvkernels.decompose(w, "tt_tucker", rank=(5, 3, 4))  # (R_T, R_S, a)
    assert [tuple(f.shape) for f in fact.factors] == [(3, 8), (4, 3, 3), (5, 4, 2), (10, 5)]
    assert fact.relative_error(w) < 1e-12


@pytest.mark.parametrize("shape,r", [((8, 6, 3, 3), 3), ((12, 8, 5, 5), 4), ((16, 8, 3, 3), 6)])
def test_cp_recovers_a_cp_kernel(shape, r):
    g = _gen(3)
    factors = [_randn(g, d, r) for d in shape]
    w = torch.einsum("tr,sr,ir,jr->tsij", *factors)
    fact = hsvkernels.decompose(w, "cp", rank=r)
    assert fact.relative_error(w) < 1e-10


def test_ht2_and_tt_tucker_agree_without_hooi():
    # Both are leaves from the channel unfoldings plus one truncated SVD of the same
    # (up to column order) matricization of the projected kernel.
    w = _randn(_gen(4), 12, 10, 3, 3)
    a = hsvkernels.decompose(w, "ht2", rank=(6, 9, 7)).to_dense()
    b = hsvkernels.decompose(w, "tt_tucker", rank=(7, 6, 9)).to_dense()
    assert _rel(a, b) < 1e-12


# Full rank is exact through the op, with every conv hyper-parameter in play --------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(10, 6, 3, 2), (6, 10, 1, 3), (4, 12, 3, 3)])
def test_full_rank_is_exact_with_strides_padding_dilation(kind, shape):
    w = _randn(_gen(5), *shape)
    fact = hsvkernels.decompose(w, kind, rank=MAX_RANK[kind](shape))
    assert fact.relative_error(w) < 1e-12
    x = _randn(_gen(6), 2, shape[1], 13, 11)
    for stride, padding, dilation in [((2, 1), (2, 0), (1, 2)), ((1, 3), (0, 1), (2, 1)), (2, 1, 1)]:
        y = hsvkernels.conv2d(x, fact, None, stride, padding, dilation)
        truth = F.conv2d(x, w, None, stride, padding, dilation)
        assert (y - truth).abs().max().item() < 1e-11 * truth.abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
def test_stage_macs_count_input_resolution_stages(kind):
    # At stride 2 the leading 1x1 runs at the input resolution and (for the separable
    # kinds) the kh x 1 stage at (Ho, W): the counter must agree with stage_macs.
    fact = CASES[kind].random((12, 8, 3, 3), dtype=torch.float32)
    x = torch.randn(2, 8, 15, 13)
    assert_flops_match_macs(fact, x, 2, 1)


# ratio= meets the parameter budget ------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ratio", [1.5, 3, 8])
def test_ratio_meets_budget(kind, ratio):
    w = _randn(_gen(7), 32, 24, 3, 3)
    kwargs = {"iters": 20} if kind == "cp" else {}
    fact = hsvkernels.decompose(w, kind, ratio=ratio, **kwargs)
    assert fact.compression() >= ratio
    assert fact.compression() < 1.25 * ratio  # and lands near it (alignment and rank steps aside)


def test_cp_ratio_picks_the_largest_rank():
    shape = (16, 8, 3, 3)
    per_rank = 16 + 8 + 3 + 3
    r = cp.rank_for_ratio(shape, 10)
    assert r * per_rank * 10 <= 16 * 8 * 9 < (r + 1) * per_rank * 10


def test_unreachable_ratio_is_an_error():
    w = _randn(_gen(8), 4, 4, 1, 1)
    for kind in KINDS:
        with pytest.raises(ValueError, match="out of reach"):
            hsvkernels.decompose(w, kind, ratio=100)


# Cross-checks against tensorly ----------------------------------------------------------

def test_tucker2_matches_tensorly_partial_tucker():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker
    tl.set_backend("pytorch")
    try:
        w = _randn(_gen(9), 12, 10, 3, 3)
        (core, (u_t, u_s)), _ = partial_tucker(w, rank=[5, 4], modes=[0, 1], n_iter_max=0, init="svd", tol=0)
        ref = torch.einsum("tc,cdij,sd->tsij", u_t, core, u_s)
        ours = hsvkernels.decompose(w, "tucker2", rank=(5, 4))
        assert _rel(ours.to_dense(), ref) < 1e-10  # HOSVD: the same subspaces, so the same kernel
        (core, (u_t, u_s)), _ = partial_tucker(w, rank=[5, 4], modes=[0, 1], n_iter_max=50, init="svd", tol=1e-14)
        ref_err = _rel(torch.einsum("tc,cdij,sd->tsij", u_t, core, u_s), w)
        hooi_err = hsvkernels.decompose(w, "tucker2", rank=(5, 4), iters=50).relative_error(w)
        assert abs(hooi_err - ref_err) < 1e-6
        assert hooi_err <= ours.relative_error(w) + 1e-12  # HOOI never loses to its HOSVD start
    finally:
        tl.set_backend("numpy")


@pytest.mark.filterwarnings("ignore:Trying to compute SVD")  # tensorly's own svd init on the 3-wide modes
def test_cp_matches_tensorly_parafac():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac
    tl.set_backend("pytorch")
    try:
        g = _gen(10)
        w = torch.einsum("tr,sr,ir,jr->tsij", *[_randn(g, d, 4) for d in (10, 8, 3, 3)])
        ref = tl.cp_to_tensor(parafac(w, rank=4, init="svd", n_iter_max=500, tol=1e-14))
        ours = hsvkernels.decompose(w, "cp", rank=4)
        assert _rel(ref, w) < 1e-6 and ours.relative_error(w) < 1e-10  # tensorly stops on its own tol
        assert _rel(ours.to_dense(), ref) < 1e-6
        # On a kernel with no exact CP, both land on fits of similar quality.
        w = _randn(g, 10, 8, 3, 3)
        ref_err = _rel(tl.cp_to_tensor(parafac(w, rank=6, init="svd", n_iter_max=300, tol=1e-10)), w)
        our_err = hsvkernels.decompose(w, "cp", rank=6, iters=300).relative_error(w)
        assert our_err < ref_err * 1.05
    finally:
        tl.set_backend("numpy")


def test_cp_is_deterministic_and_balanced():
    w = _randn(_gen(11), 10, 8, 3, 3)
    a = hsvkernels.decompose(w, "cp", rank=5, iters=50)
    b = hsvkernels.decompose(w, "cp", rank=5, iters=50)
    assert all(torch.equal(x, y) for x, y in zip(a.factors, b.factors))
    a_s, a_h, a_w, a_t = a.factors
    norms = torch.stack([a_s.norm(dim=1), a_h.norm(dim=1), a_w.norm(dim=1), a_t.norm(dim=0)])
    assert torch.allclose(norms, norms[:1].expand_as(norms), rtol=1e-10)


# HT-2 as the official code defines it ----------------------------------------------------

def test_ht2_left_svd_qr_matches_svd():
    m = _randn(_gen(12), 9, 40)
    u, s = ht2.left_svd_qr(m, 5)
    u_ref, s_ref, _ = torch.linalg.svd(m, full_matrices=False)
    assert torch.allclose(s, s_ref, atol=1e-12)
    assert torch.allclose(u @ u.T, u_ref[:, :5] @ u_ref[:, :5].T, atol=1e-12)


def test_ht2_matches_the_official_algorithm_step_by_step():
    # methods.md section 4, spelled out on the (Cin, kh, Cout, kw) permuted kernel with
    # tensordots, independent of the factor layout used by the op.
    w = _randn(_gen(20), 10, 7, 3, 2)
    r1, r13, r3 = 5, 6, 4
    wp = w.movedim(0, 2)  # (C, D1, T, D2)
    c, d1, t, d2 = wp.shape
    u1 = torch.linalg.svd(wp.reshape(c, -1), full_matrices=False)[0][:, :r1]
    u3 = torch.linalg.svd(wp.movedim(2, 0).reshape(t, -1), full_matrices=False)[0][:, :r3]
    x = torch.tensordot(torch.tensordot(wp, u1, dims=([0], [0])), u3, dims=([1], [0]))  # (D1, D2, R1, R3)
    m = x.permute(2, 0, 3, 1).reshape(r1 * d1, r3 * d2)
    g = torch.linalg.svd(m, full_matrices=False)[0][:, :r13]
    g1, g2 = g.reshape(r1, d1, r13), (g.T @ m).reshape(r13, r3, d2)
    rec = torch.tensordot(torch.tensordot(g1, g2, dims=([2], [0])), u1, dims=([0], [1]))  # (D1, R3, D2, C)
    rec = torch.tensordot(rec, u3, dims=([1], [1])).permute(2, 0, 3, 1)  # (C, D1, T, D2)
    ours = hsvkernels.decompose(w, "ht2", rank=(r1, r13, r3))
    assert _rel(ours.to_dense(), rec.movedim(2, 0)) < 1e-12


def test_ht2_energy_rule():
    g = _gen(13)
    w = torch.einsum("tc,cbj,bai,as->tsij", _randn(g, 16, 4), _randn(g, 4, 5, 3), _randn(g, 5, 3, 3),
                     _randn(g, 3, 12)) + 1e-3 * _randn(g, 16, 12, 3, 3)
    fact = hsvkernels.decompose(w, "ht2", rank="energy", energy=0.999)
    assert (fact.meta["R1"], fact.meta["R13"], fact.meta["R3"]) == (3, 5, 4)
    assert fact.relative_error(w) < 1e-2
    # By hand for a lower threshold: smallest r with cumulative energy > e, R13 from (Cin*kh) x (Cout*kw).
    e = 0.6
    fact = hsvkernels.decompose(w, "ht2", rank="energy", energy=e)
    mats = (w.permute(1, 0, 2, 3).reshape(12, -1), w.permute(1, 2, 0, 3).reshape(36, 48), w.reshape(16, -1))
    expected = []
    for m in mats:
        c = torch.linalg.svdvals(m).square().cumsum(0)
        expected.append(int((c / c[-1] <= e).sum().item()) + 1)
    assert (fact.meta["R1"], fact.meta["R13"], fact.meta["R3"]) == tuple(expected)
    assert fact.meta["energy"] == e
    full = hsvkernels.decompose(w, "ht2", rank="energy", energy=1.0)
    assert full.relative_error(w) < 1e-12


# EVBMF ----------------------------------------------------------------------------------

def _low_rank_plus_noise(gen, L, M, r, sigma=0.1, strength=(3.0, 10.0)):
    u = torch.linalg.qr(_randn(gen, L, r))[0]
    v = torch.linalg.qr(_randn(gen, M, r))[0]
    edge = sigma * (L ** 0.5 + M ** 0.5)  # the largest singular value of the noise alone
    values = edge * torch.linspace(*strength, r, dtype=torch.float64)
    return (u * values) @ v.T + sigma * _randn(gen, L, M)


@pytest.mark.parametrize("L,M,r", [(64, 576, 10), (128, 1152, 20), (576, 64, 7), (30, 40, 5), (50, 50, 1)])
def test_evbmf_recovers_rank_and_noise(L, M, r):
    y = _low_rank_plus_noise(_gen(14), L, M, r)
    res = evbmf_full(y)
    assert res.rank == r
    assert abs(res.sigma2 / 0.01 - 1) < 0.1
    assert res.shrunk.shape == (r,) and bool((res.shrunk > 0).all())
    assert evbmf(y.float()) == r


def test_evbmf_on_pure_noise_and_edge_cases():
    g = _gen(15)
    assert evbmf(_randn(g, 40, 90)) == 0
    assert evbmf(torch.zeros(5, 7)) == 0
    for bad in (torch.zeros(3), torch.zeros(0, 4), torch.tensor([[1.0, float("nan")]])):
        with pytest.raises(ValueError, match="evbmf"):
            evbmf(bad)


def test_evbmf_rank_source():
    g = _gen(16)
    core = _randn(g, 6, 4, 3, 3)
    w = torch.einsum("tc,cdij,sd->tsij", _randn(g, 48, 6), core, _randn(g, 40, 4))
    w = w / w.std() + 0.05 * _randn(g, 48, 40, 3, 3)
    fact = hsvkernels.decompose(w, "tucker2", rank="evbmf")
    assert (fact.meta["R_T"], fact.meta["R_S"]) == (6, 4)
    fact = hsvkernels.decompose(w, "tt_tucker", rank="evbmf")
    assert (fact.meta["R_T"], fact.meta["R_S"]) == (6, 4) and 1 <= fact.meta["a"] <= 12
    fact = hsvkernels.decompose(w, "ht2", rank="evbmf")
    assert (fact.meta["R1"], fact.meta["R3"]) == (4, 6) and 1 <= fact.meta["R13"] <= 12
    # Pure noise gives EVBMF rank 0, floored to 1.
    fact = hsvkernels.decompose(_randn(g, 8, 8, 3, 3), "tucker2", rank="evbmf")
    assert (fact.meta["R_T"], fact.meta["R_S"]) == (1, 1)


# Candidates -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tucker2", "ht2", "tt_tucker"])
def test_candidates_have_exact_costs_and_errors(kind):
    module = {"tucker2": tucker2, "ht2": ht2, "tt_tucker": tt_tucker}[kind]
    w = _randn(_gen(17), 16, 12, 3, 3)
    cands = module.candidates(w, (8, 8))
    assert len(cands) >= 6
    for c in cands:
        fact = hsvkernels.decompose(w, kind, **c.config)
        assert c.params == fact.num_params()
        assert c.macs == fact.macs(8, 8)
        assert c.rel_err_sq == pytest.approx(fact.relative_error(w) ** 2, rel=1e-9, abs=1e-12)


# Bad arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,rank,error,match", [
    ("tucker2", (17, 4), ValueError, r"R_T must be in \[1, 16\]"),
    ("tucker2", (4, 0), ValueError, r"R_S must be in \[1, 12\]"),
    ("tucker2", (4, 4, 4), TypeError, "tuple"),
    ("tucker2", (4.0, 4), TypeError, "R_T must be an int"),
    ("tucker2", "energy", ValueError, "'evbmf'"),
    ("cp", 0, ValueError, r"\[1, 108\]"),
    ("cp", 109, ValueError, r"\[1, 108\]"),
    ("cp", (3, 3), TypeError, "int"),
    ("ht2", (4, 20, 4), ValueError, r"R13 must be in .* = \[1, 12\]"),
    ("ht2", (13, 4, 4), ValueError, r"R1 must be in \[1, 12\]"),
    ("ht2", "tucker", ValueError, "'energy' or 'evbmf'"),
    ("tt_tucker", (4, 4, 13), ValueError, r"a must be in .* = \[1, 12\]"),
    ("tt_tucker", (4, 4), TypeError, r"\(R_T, R_S, a\)"),
])
def test_bad_ranks(kind, rank, error, match):
    w = _randn(_gen(18), 16, 12, 3, 3)
    with pytest.raises(error, match=match):
        hsvkernels.decompose(w, kind, rank=rank)


def test_bad_options():
    w = _randn(_gen(19), 8, 6, 3, 3)
    with pytest.raises(ValueError, match="energy threshold"):
        hsvkernels.decompose(w, "ht2", rank="energy", energy=1.5)
    with pytest.raises(ValueError, match="energy= goes with rank='energy'"):
        hsvkernels.decompose(w, "ht2", rank=(2, 2, 2), energy=0.9)
    for kind in ("tucker2", "tt_tucker"):
        with pytest.raises(ValueError, match="iters"):
            hsvkernels.decompose(w, kind, rank=2, iters=-1)
    with pytest.raises(ValueError, match="iters"):
        hsvkernels.decompose(w, "cp", rank=2, iters=0)


@pytest.mark.parametrize("kind,factors,match", [
    ("tucker2", [(3, 8), (4, 2, 3, 3), (6, 4)], "R_S = 3"),
    ("tucker2", [(3, 8), (4, 3, 3, 3), (6, 5)], "R_T = 4"),
    ("tucker2", [(3, 8, 1), (4, 3, 3, 3), (6, 4)], "2-D"),
    ("cp", [(3, 8), (3, 3), (2, 3), (6, 3)], "rank mismatch"),
    ("cp", [(3, 8), (3, 3), (3, 3, 1), (6, 3)], "2-D"),
    ("ht2", [(3, 8), (4, 2, 3), (5, 4, 3), (6, 5)], "R1 = 3"),
    ("ht2", [(3, 8), (4, 3, 3), (5, 3, 3), (6, 5)], "R13 = 4"),
    ("tt_tucker", [(3, 8), (4, 3, 3), (5, 4, 3), (6, 4)], "R3 = 5"),
    ("tt_tucker", [(3, 8), (4, 3, 3, 1), (5, 4, 3), (6, 5)], "3-D"),
])
def test_bad_factor_shapes_in_op_and_reference(kind, factors, match):
    x = torch.randn(1, 8, 6, 6)
    fs = [torch.randn(*s) for s in factors]
    with pytest.raises(ValueError, match=match):
        torch.ops.hsv.conv2d(x, fs, None, [1, 1], [1, 1], [1, 1], 1, kind)
    with pytest.raises(ValueError, match=match):
        hsvkernels.reference.conv2d_factors(x, fs, None, 1, 1, 1, 1, kind)
    with pytest.raises(ValueError, match=match):
        hsvkernels.Factorization(kind, fs, (6, 8, 3, 3))


@pytest.mark.parametrize("method", sorted(hsvkernels.METHODS))
def test_zero_and_one_hot_weights_give_finite_factors(method):
    # A BN with gamma = 0 (torchvision's zero_init_residual) folds into an all-zero conv; kcp and cp's ALS
    # divided 0 by 0 there (a 1e-300 clamp is 0 in float32) and handed NaN factors to the model.
    one_hot = torch.zeros(16, 16, 3, 3)
    one_hot[0, 0, 1, 1] = 1
    for w in (torch.zeros(16, 16, 3, 3), one_hot):
        fact = hsvkernels.decompose(w, method, ratio=2)
        assert all(torch.isfinite(f).all() for f in fact.factors), method
        assert torch.isfinite(fact.to_dense()).all()
    assert fact.relative_error(one_hot) <= 1.0 + 1e-6
    if method == "cp":   # a rank the ratio does not give also went through the 0/0
        assert torch.isfinite(hsvkernels.decompose(torch.zeros(16, 16, 3, 3), "cp", rank=4).to_dense()).all()


def test_non_finite_factors_are_refused_and_the_layer_stays_dense(monkeypatch):
    import importlib

    from torch import nn
    methods = importlib.import_module("hsvkernels.decompose").METHODS   # the package; hsvkernels.decompose is the function
    real = methods["svd"]

    def broken(weight, **kwargs):
        fact = real(weight, **kwargs)
        fact.factors[0].fill_(float("nan"))
        return fact
    monkeypatch.setitem(methods, "svd", broken)
    with pytest.raises(ValueError, match="produced NaN or Inf factors for the finite weight"):
        hsvkernels.decompose(torch.randn(8, 8, 3, 3), "svd", ratio=2)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    monkeypatch.setitem(methods, "svd", lambda w, **kw: (broken if w.shape[1] == 8 else real)(w, **kw))
    report = hsvkernels.convert_(model, "svd", ratio=2, min_params=0, progress=False)
    assert isinstance(model[0], nn.Conv2d) and "NaN or Inf factors" in report["0"].reason
    assert isinstance(model[1], hsvkernels.FactorizedConv2d)
