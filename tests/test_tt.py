"""kind "tt" (TT-conv with tensorized channels): format, TT-SVD, ranks, budgets, errors."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from factories import assert_flops_match_macs

import hsvkernels
from hsvkernels import formats
from hsvkernels.decompose import tt

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def _rel(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def _train(gen, out_modes, in_modes, ranks, kh, kw):
    """Random tt factors with the given modes and ranks (r_1..r_d)."""
    shape = (math.prod(out_modes), math.prod(in_modes), kh, kw)
    return [_randn(gen, *s) for s in tt.factor_shapes(shape, out_modes, in_modes, ranks)]


# The format ---------------------------------------------------------------------------

def test_to_dense_is_the_train_entry_by_entry():
    out_modes, in_modes, ranks = (2, 3, 2), (2, 2, 3), (3, 4, 5)
    fs = _train(_gen(0), out_modes, in_modes, ranks, 3, 2)
    w = formats.get("tt").to_dense(fs)
    assert w.shape == (12, 12, 3, 2)
    for t in itertools.product(*map(range, out_modes)):
        for s in itertools.product(*map(range, in_modes)):
            v = fs[0][:, t[0], s[0]] @ fs[1][:, t[1], s[1]] @ fs[2][:, t[2], s[2]] @ fs[3].reshape(5, 6)
            row = (t[0] * 3 + t[1]) * 2 + t[2]  # row-major, mode 1 most significant
            col = (s[0] * 2 + s[1]) * 3 + s[2]
            assert torch.allclose(w[row, col].reshape(-1), v.reshape(-1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("out_modes,in_modes,ranks,k", [
    ((2, 3, 2), (2, 2, 3), (3, 4, 5), (3, 2)),
    ((4, 2), (3, 2), (2, 3), (3, 3)),
    ((5,), (3,), (4,), (3, 3)),        # d = 1
    ((2, 2), (2, 4), (2, 1), (1, 1)),  # 1x1 kernel: r_d = 1
    ((16,), (3,), (2,), (3, 3)),       # d = 1, run unmerged: spatial conv 1 -> r_d, then one 1x1
    ((4, 4), (2, 2), (2, 2), (3, 3)),  # unmerged
])
def test_chain_op_and_dense_agree(out_modes, in_modes, ranks, k):
    fs = _train(_gen(1), out_modes, in_modes, ranks, *k)
    w = formats.get("tt").to_dense(fs)
    x = _randn(_gen(2), 2, w.shape[1], 11, 9)
    for stride, padding, dilation in [((2, 1), (1, 0), (1, 2)), (1, 1, 1)]:
        truth = F.conv2d(x, w, None, stride, padding, dilation)
        ref = hsvkernels.reference.conv2d_factors(x, fs, None, stride, padding, dilation, 1, "tt")
        y = torch.ops.hsv.conv2d(x, fs, None, _pair(stride), _pair(padding), _pair(dilation), 1, "tt")
        scale = truth.abs().max().item()
        assert (ref - truth).abs().max().item() < 1e-12 * scale
        assert (y - truth).abs().max().item() < 1e-12 * scale


@pytest.mark.parametrize("out_modes,in_modes,ranks,k,merged", [
    ((2, 3, 2), (2, 2, 3), (3, 4, 5), (3, 2), True),
    ((4, 2, 2), (2, 2, 3), (3, 3, 3), (3, 3), False),
    ((16,), (3,), (2,), (3, 3), False),
])
def test_params_and_macs_follow_the_formulas(out_modes, in_modes, ranks, k, merged):
    (kh, kw), d = k, len(ranks)
    fs = _train(_gen(3), out_modes, in_modes, ranks, kh, kw)
    cout, cin = math.prod(out_modes), math.prod(in_modes)
    fact = hsvkernels.Factorization("tt", fs, (cout, cin, kh, kw))
    r = (1,) + ranks
    # methods.md §6 (input modes S_k, output modes T_k, spatial core on r_d here).
    params = kh * kw * r[-1] + sum(r[k] * out_modes[k] * in_modes[k] * r[k + 1] for k in range(d))
    assert fact.num_params() == params == sum(f.numel() for f in fs)
    contraction = [math.prod(in_modes[:k]) * math.prod(out_modes[k + 1:]) * in_modes[k] * r[k + 1] * r[k]
                   * out_modes[k] for k in range(d)]
    garipov = cin * kh * kw * r[-1] + sum(contraction)
    # The op runs G_d and K as one conv S_d -> r_{d-1}*T_d where that costs no more.
    one_conv = cin * r[-2] * out_modes[-1] * kh * kw + sum(contraction[:-1])
    assert formats.get("tt").layout([f.shape for f in fs]).merged == merged == (one_conv <= garipov)
    assert fact.macs(5, 7) == min(garipov, one_conv) * 35


@pytest.mark.parametrize("ranks", [(2, 2, 5), (3, 3, 3)], ids=["merged", "unmerged"])
def test_stage_macs_match_the_flop_counter_at_stride_2(ranks):
    fs = [f.float() for f in _train(_gen(4), (4, 2, 2), (2, 2, 3), ranks, 3, 3)]
    fact = hsvkernels.Factorization("tt", fs, (16, 12, 3, 3))
    x = torch.randn(2, 12, 15, 13)
    assert_flops_match_macs(fact, x, 2, 1)


@pytest.mark.parametrize("out_modes,in_modes,ranks", [((3, 2), (2, 2), (2, 5)), ((3, 2), (2, 2), (3, 3)),
                                                      ((5,), (3,), (4,)), ((16,), (3,), (2,))])
def test_gradients_of_both_stage_forms(out_modes, in_modes, ranks):
    lay = formats.get("tt").layout(tt.factor_shapes((math.prod(out_modes), math.prod(in_modes), 3, 3),
                                                    out_modes, in_modes, ranks))
    assert lay.merged == (ranks in ((2, 5), (4,)))
    # The merged form splits its weight gradient over G_d and K in the chain engine.
    fs = [f.requires_grad_() for f in _train(_gen(16), out_modes, in_modes, ranks, 3, 3)]
    x = _randn(_gen(17), 2, math.prod(in_modes), 6, 5).requires_grad_()

    def fn(x, *factors):
        return torch.ops.hsv.conv2d(x, list(factors), None, [2, 1], [1, 1], [1, 2], 1, "tt")

    assert torch.autograd.gradcheck(fn, (x, *fs), eps=1e-6, atol=1e-7)
    y = fn(x, *fs)
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, [x, *fs], g)
    dense = F.conv2d(x, formats.get("tt").to_dense(fs), None, (2, 1), 1, (1, 2))
    for a, b in zip(ours, torch.autograd.grad(dense, [x, *fs], g)):
        assert (a - b).abs().max().item() < 1e-10


# TT-SVD ---------------------------------------------------------------------------------

@pytest.mark.parametrize("out_modes,in_modes,ranks,k", [
    ((2, 3, 2), (2, 2, 3), (3, 4, 5), (3, 3)),
    ((4, 4), (2, 8), (3, 2), (3, 1)),
    ((6,), (3,), (2,), (3, 3)),
    ((2, 2, 2, 2), (2, 2, 2, 2), (2, 3, 3, 1), (1, 1)),  # 1x1 kernel: r_d = 1
])
def test_recovers_a_tt_kernel_at_its_ranks(out_modes, in_modes, ranks, k):
    w = formats.get("tt").to_dense(_train(_gen(5), out_modes, in_modes, ranks, *k))
    fact = hsvkernels.decompose(w, "tt", rank=ranks, in_modes=in_modes, out_modes=out_modes)
    assert [tuple(f.shape) for f in fact.factors] == tt.factor_shapes(w.shape, out_modes, in_modes, ranks)
    assert fact.relative_error(w) < 1e-10
    # One rank below the truth in any slot loses something.
    for slot in range(len(ranks)):
        if ranks[slot] > 1:
            lower = ranks[:slot] + (ranks[slot] - 1,) + ranks[slot + 1:]
            low = hsvkernels.decompose(w, "tt", rank=lower, in_modes=in_modes, out_modes=out_modes)
            assert low.relative_error(w) > 1e-6


@pytest.mark.parametrize("shape", [(16, 12, 3, 3), (64, 3, 3, 3), (10, 6, 3, 2), (8, 32, 1, 1), (7, 5, 3, 3)])
def test_full_rank_is_exact_through_the_op(shape):
    w = _randn(_gen(6), *shape)
    fact = hsvkernels.decompose(w, "tt", rank=10 ** 6)
    assert fact.meta["ranks"] == tt.rank_bounds(shape, fact.meta["out_modes"], fact.meta["in_modes"])
    assert fact.relative_error(w) < 1e-12
    x = _randn(_gen(7), 2, shape[1], 13, 11)
    for stride, padding, dilation in [((2, 1), (2, 0), (1, 2)), (2, 1, 1)]:
        y = hsvkernels.conv2d(x, fact, None, stride, padding, dilation)
        truth = F.conv2d(x, w, None, stride, padding, dilation)
        assert (y - truth).abs().max().item() < 1e-11 * truth.abs().max().item()


def test_error_shrinks_as_the_rank_grows_and_matches_the_energy():
    w = _randn(_gen(8), 16, 16, 3, 3)
    errors = []
    for r in range(1, 37):
        fact = hsvkernels.decompose(w, "tt", rank=r)
        err = fact.relative_error(w)
        assert err ** 2 == pytest.approx(1 - fact.meta["energy"], abs=1e-12)  # an orthogonal projection
        errors.append(err)
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[0] > 0.9 and errors[-1] < 1e-12


def test_equals_tensorly_tensor_train():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train
    tl.set_backend("pytorch")
    try:
        w = _randn(_gen(9), 24, 16, 3, 3)
        out_modes, in_modes = (4, 3, 2), (2, 2, 4)
        for ranks in [(3, 5, 4), (8, 20, 9), (1, 1, 1)]:
            ours = hsvkernels.decompose(w, "tt", rank=ranks, in_modes=in_modes, out_modes=out_modes)
            # The same tensor in tensorly's terms: modes (T_1 S_1, T_2 S_2, T_3 S_3, kh kw).
            t = w.reshape(*out_modes, *in_modes, 9).permute(0, 3, 1, 4, 2, 5, 6).reshape(8, 6, 8, 9)
            ref = tl.tt_to_tensor(tensor_train(t, rank=[1, *ranks, 1]))
            ref = ref.reshape(4, 2, 3, 2, 2, 4, 3, 3).permute(0, 2, 4, 1, 3, 5, 6, 7).reshape(24, 16, 3, 3)
            assert _rel(ours.to_dense(), ref) < 1e-10
    finally:
        tl.set_backend("numpy")


# Channel modes ---------------------------------------------------------------------------

def test_automatic_channel_modes():
    assert tt.split_modes(256, 3) == (4, 8, 8)
    assert tt.split_modes(96, 3) == (4, 4, 6)
    assert tt.split_modes(3, 3) == (1, 1, 3)
    assert tt.channel_modes((256, 256, 3, 3)) == ((8, 8, 4), (4, 8, 8))  # out descending, in ascending
    assert tt.channel_modes((64, 3, 3, 3)) == ((64,), (3,))              # Cin = 3 is prime: d = 1
    assert tt.channel_modes((12, 6, 3, 3)) == ((4, 3), (2, 3))           # Cin = 2*3: d = 2
    assert tt.channel_modes((64, 3, 3, 3), d=2) == ((8, 8), (1, 3))
    assert tt.channel_modes((64, 32, 3, 3), in_modes=(8, 4)) == ((8, 8), (8, 4))
    fact = hsvkernels.decompose(_randn(_gen(10), 64, 3, 3, 3), "tt", rank=4)
    assert [tuple(f.shape) for f in fact.factors] == [(1, 64, 3, 4), (4, 3, 3)]


def test_d1_layer_converts_and_runs():
    conv = torch.nn.Conv2d(3, 16, 3, padding=1, stride=2)
    layer = hsvkernels.FactorizedConv2d.from_conv(conv, method="tt", rank=9)
    x = torch.randn(2, 3, 9, 9)
    assert (layer(x) - conv(x)).abs().max().item() < 1e-5


# Budgets --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(32, 24, 3, 3), (64, 64, 3, 3), (64, 3, 3, 3), (16, 64, 1, 1)])
@pytest.mark.parametrize("ratio", [1.5, 3, 8])
def test_ratio_meets_the_budget_with_the_largest_uniform_rank(shape, ratio):
    w = _randn(_gen(11), *shape)
    fact = hsvkernels.decompose(w, "tt", ratio=ratio)
    assert fact.compression() >= ratio
    assert fact.macs(4, 4) <= fact.dense_macs(4, 4)  # never slower than dense on paper
    out_modes, in_modes, ranks = fact.meta["out_modes"], fact.meta["in_modes"], fact.meta["ranks"]
    bounds = tt.rank_bounds(shape, out_modes, in_modes)
    bigger = tt.uniform_ranks(max(ranks) + 1, bounds)
    if bigger != ranks:
        params = tt.num_params(shape, out_modes, in_modes, bigger)
        macs = tt.macs_per_position(shape, out_modes, in_modes, bigger)
        assert params * ratio > math.prod(shape) or macs > math.prod(shape)


def test_macs_ratio_meets_the_mac_budget():
    w = _randn(_gen(12), 64, 64, 3, 3)
    for macs_ratio in (2, 4):
        fact = hsvkernels.decompose(w, "tt", macs_ratio=macs_ratio)
        assert fact.dense_macs(7, 7) / fact.macs(7, 7) >= macs_ratio
    both = hsvkernels.decompose(w, "tt", ratio=50, macs_ratio=2)
    assert both.compression() >= 50 and both.dense_macs(1, 1) / both.macs(1, 1) >= 2


def test_unreachable_budget_is_an_error():
    w = _randn(_gen(13), 4, 4, 1, 1)
    with pytest.raises(ValueError, match="out of reach"):
        hsvkernels.decompose(w, "tt", ratio=100)


# Candidates -------------------------------------------------------------------------------

def test_candidates_have_exact_costs_and_errors():
    w = _randn(_gen(14), 32, 16, 3, 3)
    cands = tt.candidates(w, (8, 8))
    assert len(cands) >= 4
    for c in cands:
        fact = hsvkernels.decompose(w, "tt", **c.config)
        assert c.params == fact.num_params() < fact.dense_params()
        assert c.macs == fact.macs(8, 8) <= fact.dense_macs(8, 8)
        assert c.rel_err_sq == pytest.approx(fact.relative_error(w) ** 2, rel=1e-9, abs=1e-12)


# Bad arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    ({"rank": 2, "in_modes": (2, 4)}, ValueError, r"in_modes \(2, 4\) multiply to 8, but the weight has Cin = 12"),
    ({"rank": 2, "out_modes": (4, 5)}, ValueError, r"out_modes \(4, 5\) multiply to 20, but the weight has Cout = 16"),
    ({"rank": 2, "in_modes": (3, 4), "out_modes": (2, 2, 4)}, ValueError, "same length d"),
    ({"rank": 2, "in_modes": (3, 4), "d": 3}, ValueError, "does not match"),
    ({"rank": 2, "in_modes": 12}, TypeError, "non-empty tuple"),
    ({"rank": 2, "in_modes": (0, 12)}, ValueError, "positive ints"),
    ({"rank": 2, "d": 0}, ValueError, "d .* positive int"),
    ({"rank": 0}, ValueError, "rank must be >= 1"),
    ({"rank": (2, 2)}, TypeError, r"\(r_1, ..., r_3\)"),
    ({"rank": (2, 2.0, 2)}, TypeError, "r_2 must be an int"),
    ({"rank": (9, 2, 2)}, ValueError, r"r_1 must be in \[1, 8\]"),
    ({"rank": (2, 2, 10)}, ValueError, r"r_3 must be in \[1, 9\]"),
    ({"rank": (1, 32, 9)}, ValueError, r"r_2 must be in \[1, 4\] .* r_1 = 1"),  # r_1*T_2*S_2 = 4 rows
    ({"rank": "evbmf"}, ValueError, "int or a tuple"),
])
def test_bad_decompose_arguments(kwargs, error, match):
    w = _randn(_gen(15), 16, 12, 3, 3)  # automatic modes: out (4, 2, 2), in (2, 2, 3)
    with pytest.raises(error, match=match):
        hsvkernels.decompose(w, "tt", **kwargs)


@pytest.mark.parametrize("factors,match", [
    ([(1, 4, 8, 3)], "expected d \\+ 1 >= 2 factors"),
    ([(1, 4, 8), (3, 3, 3)], r"factors\[0\] \(G_1\) must be 4-D"),
    ([(1, 4, 8, 3), (3, 3, 3, 1)], r"factors\[1\] \(K, the last factor\) must be 3-D"),
    ([(2, 4, 8, 3), (3, 3, 3)], "r_0 = 1"),
    ([(1, 2, 2, 3), (2, 2, 4, 2), (2, 3, 3)], r"factors\[0\] \(G_1\) has r_1 = 3 but factors\[1\] \(G_2\)"),
    ([(1, 2, 2, 3), (3, 2, 4, 2), (4, 3, 3)], r"has r_2 = 2 but factors\[2\] \(K\) has shape"),
    ([(1, 4, 8, 0), (0, 3, 3)], "empty dimension"),
])
def test_bad_factor_shapes_in_op_meta_and_reference(factors, match):
    x = torch.randn(1, 8, 6, 6)
    fs = [torch.randn(*s) for s in factors]
    with pytest.raises(ValueError, match=match):
        torch.ops.hsv.conv2d(x, fs, None, [1, 1], [1, 1], [1, 1], 1, "tt")
    with pytest.raises(ValueError, match=match):
        torch.ops.hsv.conv2d(x.to("meta"), [f.to("meta") for f in fs], None, [1, 1], [1, 1], [1, 1], 1, "tt")
    with pytest.raises(ValueError, match=match):
        hsvkernels.reference.conv2d_factors(x, fs, None, 1, 1, 1, 1, "tt")
    with pytest.raises(ValueError, match=match):
        hsvkernels.Factorization("tt", fs, (4, 8, 3, 3))


def test_input_channels_must_match_the_modes():
    fs = [torch.randn(1, 2, 2, 3), torch.randn(3, 2, 4, 2), torch.randn(2, 3, 3)]  # Cin = 8
    x = torch.randn(1, 6, 6, 6)
    with pytest.raises(ValueError, match="input has 6 channels but the factors expect Cin = 8"):
        torch.ops.hsv.conv2d(x, fs, None, [1, 1], [1, 1], [1, 1], 1, "tt")
    with pytest.raises(ValueError, match="input has 6 channels but the factors expect Cin = 8"):
        hsvkernels.reference.conv2d_factors(x, fs, None, 1, 1, 1, 1, "tt")
