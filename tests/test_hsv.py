"""kind "hsv" and method "hsv": the Kronecker-SVD decomposition, its level-2 layouts, costs and errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from hsv_case import LAYOUTS, random_factors
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import hsvkernels
from hsvkernels import Factorization, reference
from hsvkernels.decompose import hsv as hsv_method


# Small eigenproblems: extra OpenMP threads only add contention (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def kronecker_sum(split, rank, kh=3, kw=3, dtype=torch.float64):
    """A dense kernel that is exactly a sum of `rank` Kronecker products for `split`."""
    t1, s1, t2, s2 = split
    a = torch.randn(t1, s1, rank, dtype=dtype)
    b = torch.randn(rank, t2, s2, kh, kw, dtype=dtype)
    return Factorization("hsv", [b, a], (t1 * t2, s1 * s2, kh, kw)).to_dense()


def rel_err(fact, weight):
    return fact.relative_error(weight)


# Decomposition: exactness and optimality --------------------------------------------------

@pytest.mark.parametrize("split,rank", [((8, 4, 4, 8), 3), ((16, 2, 2, 16), 5), ((4, 4, 4, 4), 1)])
def test_recovers_synthetic_kronecker_sum(split, rank):
    weight = kronecker_sum(split, rank)
    fact = hsvkernels.decompose(weight, "hsv", split=split, rank=rank)
    assert rel_err(fact, weight) < 1e-10
    # The rearranged matrix has exactly `rank` non-zero singular values.
    sq = hsv_method.energies(weight, split)
    assert sq[rank:].sum() < 1e-13 * sq.sum()  # zero up to the Gram matrix rounding
    # The automatic split finds the structure when given only the rank.
    auto = hsvkernels.decompose(weight, "hsv", rank=rank)
    assert rel_err(auto, weight) < 1e-10


@pytest.mark.parametrize("shape,split", [((16, 8, 3, 3), (4, 2, 4, 4)), ((16, 8, 3, 3), (16, 1, 1, 8)),
                                         ((12, 6, 1, 3), (3, 3, 4, 2)), ((8, 8, 1, 1), (2, 8, 4, 1))])
def test_full_rank_is_exact(shape, split):
    weight = torch.randn(*shape, dtype=torch.float64)
    p = hsv_method.max_rank(shape, split)
    fact = hsvkernels.decompose(weight, "hsv", split=split, rank=p)
    assert rel_err(fact, weight) < 1e-12
    t1, s1, t2, s2 = split
    # Level 2 at full q1, q2 is exact as well.
    full = (min(p * t2, s2 * shape[2] * shape[3]), min(t1, s1 * p))
    fact2 = hsvkernels.decompose(weight, "hsv", split=split, rank=p, level2=full)
    assert len(fact2.factors) == 4 and rel_err(fact2, weight) < 1e-12


def test_error_is_monotone_in_rank_and_equals_dropped_energy():
    shape, split = (16, 8, 3, 3), (4, 2, 4, 4)
    weight = torch.randn(*shape, dtype=torch.float64)
    fractions = hsv_method.tail_fractions(hsv_method.energies(weight, split))
    errors = []
    for p in range(1, hsv_method.max_rank(shape, split) + 1):
        fact = hsvkernels.decompose(weight, "hsv", split=split, rank=p)
        errors.append(rel_err(fact, weight))
        assert errors[-1] ** 2 == pytest.approx(fractions[p], abs=1e-12)  # Eckart-Young on R(W)
    assert all(b <= a + 1e-14 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-12


def test_beats_svd_at_equal_parameters_on_kronecker_kernels():
    split = (16, 4, 4, 16)
    weight = kronecker_sum(split, 4)
    weight = weight + 1e-3 * weight.std() * torch.randn_like(weight)
    fact = hsvkernels.decompose(weight, "hsv", split=split, rank=4)
    svd_rank = fact.num_params() // (64 + 64 * 9)  # SVD rank with no more parameters than HSV
    svd = hsvkernels.decompose(weight, "svd", rank=svd_rank)
    assert svd.num_params() <= fact.num_params()
    assert rel_err(fact, weight) < 0.01 < rel_err(svd, weight)


# Budgets ---------------------------------------------------------------------------------

RESNET_SHAPES = [
    (64, 3, 7, 7),                                     # stem: Cin = 3 does not factor
    (64, 64, 3, 3), (128, 64, 3, 3), (128, 128, 3, 3), (256, 256, 3, 3),   # ResNet-18 3x3
    (128, 64, 1, 1), (512, 256, 1, 1),                 # ResNet-18 downsample
    (64, 64, 1, 1), (256, 64, 1, 1), (64, 256, 1, 1), (1024, 256, 1, 1), (256, 1024, 1, 1),  # ResNet-50 1x1
]


@pytest.mark.parametrize("shape", RESNET_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_budgets_met_on_resnet_shapes(shape):
    weight = torch.randn(*shape)
    dense = math.prod(shape)
    for targets in ({"ratio": 4}, {"macs_ratio": 3}, {"ratio": 2, "macs_ratio": 2}):
        fact = hsvkernels.decompose(weight, "hsv", **targets)
        macs = fact.macs(1, 1)
        assert dense / fact.num_params() >= targets.get("ratio", 1)
        assert dense / macs >= targets.get("macs_ratio", 1)  # with only ratio: never more MACs than dense
        t1, s1, t2, s2 = fact.meta["split"]
        assert (t1 * t2, s1 * s2) == shape[:2]
        assert fact.meta["rank"] < 16 or fact.meta["rank"] % 8 == 0  # aligned GEMM sizes
        assert fact.factors[0].dtype == weight.dtype


def test_level2_with_targets():
    weight = torch.randn(64, 64, 3, 3)
    level1 = hsvkernels.decompose(weight, "hsv", ratio=4)
    t1, s1, t2, s2 = level1.meta["split"]
    p = level1.meta["rank"]
    fact = hsvkernels.decompose(weight, "hsv", ratio=4, level2=(max(1, p * t2 // 4), max(1, min(t1, s1 * p) // 4)))
    assert fact.meta["split"] == level1.meta["split"] and fact.compression() >= level1.compression() >= 4
    # Level-2 ranks that undo the savings are refused rather than missing the target.
    with pytest.raises(ValueError, match="lower q1/q2"):
        hsvkernels.decompose(weight, "hsv", ratio=4, level2=(min(p * t2, s2 * 9), None))


@pytest.mark.parametrize("shape,targets", [((64, 64, 3, 3), {"ratio": 4}), ((128, 64, 3, 3), {"ratio": 8}),
                                           ((96, 48, 3, 3), {"ratio": 4, "macs_ratio": 3}),
                                           ((64, 3, 7, 7), {"ratio": 4}), ((64, 32, 1, 1), {"macs_ratio": 2})])
def test_level2_auto_meets_targets_and_never_loses_to_two_levels(shape, targets):
    gen = torch.Generator().manual_seed(1)
    # Decaying spectrum: the regime where level 2 can pay off.
    weight = (torch.randn(*shape, generator=gen, dtype=torch.float64)
              * torch.linspace(1, 0.05, shape[0], dtype=torch.float64)[:, None, None, None])
    auto = hsvkernels.decompose(weight, "hsv", level2="auto", **targets)
    two = hsvkernels.decompose(weight, "hsv", **targets)
    dense = math.prod(shape)
    assert auto.num_params() * targets.get("ratio", 1) <= dense
    assert auto.macs(1, 1) * targets.get("macs_ratio", 1) <= dense
    assert rel_err(auto, weight) <= rel_err(two, weight) + 1e-12
    assert math.isclose(1 - auto.meta["energy"], rel_err(auto, weight) ** 2, rel_tol=1e-6, abs_tol=1e-12)


def test_level2_auto_recovers_a_hierarchical_kernel_two_levels_cannot():
    # P = 12 Kronecker terms whose merged B has rank 4: at 8x the 2-level form keeps
    # at most 7 terms, but a milder level 1 plus q1 >= 4 is exact.
    split, p, q1 = (8, 8, 8, 8), 12, 4
    t1, s1, t2, s2 = split
    gen = torch.Generator().manual_seed(0)
    b = (torch.randn(p * t2, q1, generator=gen, dtype=torch.float64)
         @ torch.randn(q1, s2 * 9, generator=gen, dtype=torch.float64)).reshape(p, t2, s2, 3, 3)
    a = torch.randn(t1, s1, p, generator=gen, dtype=torch.float64)
    weight = Factorization("hsv", [b, a], (64, 64, 3, 3)).to_dense()
    auto = hsvkernels.decompose(weight, "hsv", ratio=8, split=split, level2="auto")
    two = hsvkernels.decompose(weight, "hsv", ratio=8, split=split)
    assert auto.meta["level2"] is not None  # some level-2 layout, not the 2-level one
    assert auto.compression() >= 8 and rel_err(auto, weight) < 1e-9
    assert rel_err(two, weight) > 1e-2
    # The chosen layout runs through the op like any other hsv factorization.
    x = torch.randn(2, 64, 9, 9, dtype=torch.float64)
    y = torch.ops.hsv.conv2d(x, auto.factors, None, [1, 1], [1, 1], [1, 1], 1, "hsv")
    torch.testing.assert_close(y, F.conv2d(x, auto.to_dense(), padding=1))


def test_picks_the_least_error_split_that_meets_the_targets():
    shape = (32, 32, 3, 3)
    weight = torch.randn(*shape, dtype=torch.float64)
    fact = hsvkernels.decompose(weight, "hsv", ratio=3, macs_ratio=2)
    best = min(hsv_method.tail_fractions(hsv_method.energies(weight, s))[p]
               for s in hsv_method.split_pool(shape)
               for p in [hsv_method.largest_rank(shape, s, 3, 2)] if p >= 1)
    assert rel_err(fact, weight) ** 2 == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("shape", [(64, 3, 7, 7), (13, 11, 3, 3), (7, 3, 3, 3), (5, 1, 1, 1)])
def test_channels_that_do_not_factor_fall_back_to_svd_layout(shape):
    weight = torch.randn(*shape, dtype=torch.float64)
    if shape[0] > 13:
        fact = hsvkernels.decompose(weight, "hsv", ratio=2)
    else:
        fact = hsvkernels.decompose(weight, "hsv", rank=min(shape[0], shape[1] * shape[2] * shape[3]))
        assert rel_err(fact, weight) < 1e-12
    if shape[0] in (13, 7, 5):  # prime Cout: only the SVD split remains
        assert fact.meta["svd_layout"] and fact.meta["split"] == (shape[0], 1, 1, shape[1])
    x = torch.randn(1, shape[1], 8, 8, dtype=torch.float64)
    torch.testing.assert_close(hsvkernels.conv2d(x, fact, None, 1, 1), F.conv2d(x, fact.to_dense(), None, 1, 1))


def test_svd_split_equals_plain_svd():
    weight = torch.randn(12, 10, 3, 3, dtype=torch.float64)
    fact = hsvkernels.decompose(weight, "hsv", split=(12, 1, 1, 10), rank=5)
    svd = hsvkernels.decompose(weight, "svd", rank=5)
    assert fact.num_params() == svd.num_params() and fact.macs(4, 4) == svd.macs(4, 4)
    assert rel_err(fact, weight) == pytest.approx(rel_err(svd, weight), abs=1e-12)


def test_candidates_match_decompositions():
    weight = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    assert "hsv" in hsvkernels.METHODS
    cands = hsv_method.candidates(weight, (5, 7))
    dense = 16 * 8 * 9
    assert cands and all(c.params <= dense and c.macs <= dense * 35 for c in cands)
    assert len({tuple(c.config["split"]) for c in cands}) > 1
    for c in cands[:: max(1, len(cands) // 12)]:
        fact = hsvkernels.decompose(weight, "hsv", **c.config)
        assert fact.num_params() == c.params and fact.macs(5, 7) == c.macs
        assert rel_err(fact, weight) ** 2 == pytest.approx(c.rel_err_sq, abs=1e-12)


def test_from_conv_with_macs_ratio():
    conv = torch.nn.Conv2d(16, 32, 3, padding=1, bias=True)
    layer = hsvkernels.FactorizedConv2d.from_conv(conv, "hsv", macs_ratio=2)
    x = torch.randn(2, 16, 9, 9)
    assert layer(x).shape == (2, 32, 9, 9)
    assert layer.factorization.dense_macs(9, 9) >= 2 * layer.factorization.macs(9, 9)


# The four factor layouts through the op ----------------------------------------------------

OP_SPECS = [
    # (N, Cin, Cout, H, W, kh, kw, stride, padding, dilation)
    (2, 8, 16, 9, 11, 3, 3, 2, 1, 2),
    (3, 6, 10, 6, 5, 2, 3, (2, 1), (0, 1), (1, 2)),
    (2, 12, 8, 7, 7, 1, 1, 1, 0, 1),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", OP_SPECS, ids=["3x3", "odd", "1x1"])
def test_layouts_match_dense_and_reference(layout, spec):
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
    fact = random_factors((cout, cin, kh, kw), layout=layout)
    assert len(fact.factors) == 2 + sum(LAYOUTS[layout])
    x = torch.randn(n, cin, h, w, dtype=torch.float64)
    bias = torch.randn(cout, dtype=torch.float64)
    truth = F.conv2d(x, fact.to_dense(), bias, stride, padding, dilation)
    y = hsvkernels.conv2d(x, fact, bias, stride, padding, dilation)
    torch.testing.assert_close(y, truth, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(reference.conv2d(x, fact, bias, stride, padding, dilation), truth,
                               rtol=1e-11, atol=1e-11)
    x32 = x.float().contiguous(memory_format=torch.channels_last)
    y32 = hsvkernels.conv2d(x32, fact.to(torch.float32), bias.float(), stride, padding, dilation)
    assert y32.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y32.double(), truth, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_gradcheck_and_opcheck(layout):
    fact = random_factors((6, 4, 3, 3), layout=layout)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    factors = [f.clone().requires_grad_() for f in fact.factors]
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    nf = len(factors)

    def fn(x, *rest):
        return torch.ops.hsv.conv2d(x, list(rest[:nf]), rest[nf], [2, 2], [1, 1], [1, 1], 1, "hsv")

    assert torch.autograd.gradcheck(fn, (x, *factors, bias), eps=1e-6, atol=1e-7)
    f32 = [f.detach().float().requires_grad_() for f in factors]
    x32 = x.detach().float().requires_grad_()
    torch.library.opcheck(torch.ops.hsv.conv2d.default, (x32, f32, None, [2, 2], [1, 1], [1, 1], 1, "hsv"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_costs_count_tensors_and_flops(layout):
    shape = (16, 8, 3, 3)
    fact = random_factors(shape, dtype=torch.float32, layout=layout)
    assert fact.num_params() == sum(f.numel() for f in fact.factors)
    x = torch.randn(3, 8, 9, 11)
    with FlopCounterMode(display=False) as op_count:
        y = hsvkernels.conv2d(x, fact, None, 1, 1)
    with FlopCounterMode(display=False) as ref_count:
        reference.conv2d(x, fact, None, 1, 1)
    expected = 2 * 3 * fact.macs(y.shape[2], y.shape[3])
    assert op_count.get_total_flops() == ref_count.get_total_flops() == expected
    if layout == "level1":  # the closed forms of methods.md §2.2
        t1, s1, p = fact.factors[1].shape
        _, t2, s2, kh, kw = fact.factors[0].shape
        assert fact.num_params() == p * (t1 * s1 + t2 * s2 * kh * kw)
        assert fact.macs(1, 1) == p * (t2 * 8 * kh * kw + 16 * s1)


def test_level2_factors_the_merged_factors():
    shape, split, p = (32, 16, 3, 3), (8, 4, 4, 4), 6
    weight = torch.randn(*shape, dtype=torch.float64)
    level1 = hsvkernels.decompose(weight, "hsv", split=split, rank=p)
    fact = hsvkernels.decompose(weight, "hsv", split=split, rank=p, level2=(10, 5))
    b1, b2, a1, a2 = fact.factors
    assert b1.shape == (10, 4, 3, 3) and b2.shape == (6, 4, 10) and a1.shape == (5, 4, 6) and a2.shape == (8, 5)
    # Each level-2 pair is the best rank-q approximation of the level-1 merged factor.
    b, a = level1.factors
    bm = b.reshape(p * 4, -1)
    s = torch.linalg.svdvals(bm)
    got = (b2.reshape(-1, 10) @ b1.reshape(10, -1) - bm).norm()
    assert got.item() == pytest.approx(s[10:].norm().item(), rel=1e-9)
    sa = torch.linalg.svdvals(a.reshape(8, -1))
    got_a = (a2 @ a1.reshape(5, -1) - a.reshape(8, -1)).norm()
    assert got_a.item() == pytest.approx(sa[5:].norm().item(), rel=1e-9)
    assert fact.num_params() < level1.num_params() and fact.macs(1, 1) < level1.macs(1, 1)
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(hsvkernels.conv2d(x, fact, None, 1, 1), F.conv2d(x, fact.to_dense(), None, 1, 1))
    assert fact.meta["level2"] == (10, 5)


# Bad arguments --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"split": (3, 2, 4, 4), "rank": 1}, "does not divide the channels"),
    ({"split": (4, 2, 4), "rank": 1}, "4 positive ints"),
    ({"split": (4, 2, 4, 4), "rank": 9}, r"\[1, 8\]"),
    ({"split": (4, 2, 4, 4), "rank": 0}, r"\[1, 8\]"),
    ({"rank": 10 ** 6}, "for any split"),
    ({"ratio": 0.5}, ">= 1"),
    ({"macs_ratio": 0.9}, ">= 1"),
    ({"rank": 2, "ratio": 2}, "not both"),
    ({"rank": 2, "macs_ratio": 2}, "not both"),
    ({}, "give rank="),
    ({"ratio": 1e6}, "out of reach"),
    ({"split": (4, 2, 4, 4), "rank": 2, "level2": (9, None)}, "q1"),
    ({"split": (4, 2, 4, 4), "rank": 2, "level2": (None, 5)}, "q2"),
    ({"split": (4, 2, 4, 4), "rank": 2, "level2": 3}, "pair"),
    ({"rank": 2, "level2": "auto"}, "not rank="),
    ({"level2": "auto"}, "give rank= or ratio="),
    ({"ratio": 2, "level2": "best"}, "'auto'"),
    ({"ratio": 1e6, "level2": "auto"}, "out of reach"),
])
def test_bad_decompose_arguments(kwargs, match):
    weight = torch.randn(16, 8, 3, 3)
    with pytest.raises(ValueError, match=match):
        hsvkernels.decompose(weight, "hsv", **kwargs)


def test_macs_ratio_rejected_by_methods_without_it():
    with pytest.raises(ValueError, match="does not take macs_ratio"):
        hsvkernels.decompose(torch.randn(8, 8, 3, 3), "cp", macs_ratio=2)


def _shapes(*shapes):
    return [torch.randn(*s) for s in shapes]


@pytest.mark.parametrize("factors,match", [
    (_shapes((3, 4, 4, 3, 3)), "2 to 4 factors"),
    (_shapes((3, 4, 4, 3, 3), (4, 2, 2)), r"\(T1, S1, P\) with P = 3"),
    (_shapes((3, 4, 4, 3), (4, 2, 3)), "expected"),
    (_shapes((3, 4, 4), (4, 2, 3)), "factors\\[0\\] must be"),
    (_shapes((2, 4, 3, 3), (3, 4, 5), (4, 2, 3)), "q1 = 2"),
    (_shapes((3, 4, 4, 3, 3), (2, 2, 3), (4, 3)), "q2 = 2"),
    (_shapes((3, 4, 4, 3, 3), (4, 3, 3)), "expect Cin"),
    (_shapes((3, 4, 0, 3, 3), (4, 2, 3)), "empty"),
])
def test_bad_factor_shapes_same_error_in_op_fake_and_reference(factors, match):
    x = torch.randn(1, 8, 6, 6)
    for device in ("cpu", "meta"):  # meta runs the fake kernel
        with pytest.raises(ValueError, match=match):
            torch.ops.hsv.conv2d(x.to(device), [f.to(device) for f in factors], None, [1, 1], [1, 1], [1, 1], 1, "hsv")
    with pytest.raises(ValueError, match=match):
        reference.conv2d_factors(x, factors, None, [1, 1], [1, 1], [1, 1], 1, "hsv")


# Random layouts: the C++ plan, the fake kernel, the reference chain and stage_macs agree ----

@settings(max_examples=30, deadline=None)
@given(t1=st.integers(1, 4), s1=st.integers(1, 4), t2=st.integers(1, 4), s2=st.integers(1, 4),
       p=st.integers(1, 4), kh=st.integers(1, 3), kw=st.integers(1, 3), q1=st.none() | st.integers(1, 3),
       q2=st.none() | st.integers(1, 3), stride=st.integers(1, 2))
def test_random_layouts_agree(t1, s1, t2, s2, p, kh, kw, q1, q2, stride):
    fs = [torch.randn(p, t2, s2, kh, kw, dtype=torch.float64)] if q1 is None else \
        [torch.randn(q1, s2, kh, kw, dtype=torch.float64), torch.randn(p, t2, q1, dtype=torch.float64)]
    fs += [torch.randn(t1, s1, p, dtype=torch.float64)] if q2 is None else \
        [torch.randn(q2, s1, p, dtype=torch.float64), torch.randn(t1, q2, dtype=torch.float64)]
    x = torch.randn(2, s1 * s2, 7, 6, dtype=torch.float64)
    args = ([stride, stride], [1, 1], [1, 1], 1, "hsv")
    with FlopCounterMode(display=False) as op_count:
        y = torch.ops.hsv.conv2d(x, fs, None, *args)
    with FlopCounterMode(display=False) as ref_count:
        y_ref = reference.conv2d_factors(x, fs, None, *args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        y_fake = torch.ops.hsv.conv2d(mode.from_tensor(x), [mode.from_tensor(f) for f in fs], None, *args)
    fmt = hsvkernels.FORMATS["hsv"]
    truth = F.conv2d(x, fmt.to_dense(fs), None, stride, 1)
    assert y.shape == y_ref.shape == y_fake.shape == truth.shape
    torch.testing.assert_close(y, truth, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_ref, truth, rtol=1e-10, atol=1e-10)
    macs = fmt.stage_macs([f.shape for f in fs], (7, 6), tuple(y.shape[2:]))
    assert len(macs) == len(fs) and op_count.get_total_flops() == ref_count.get_total_flops() == 2 * 2 * sum(macs)
