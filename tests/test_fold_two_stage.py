"""Folding tucker2, ht2, tt_tucker, cp and level-2 hsv factors into the two-stage
form (csrc/ops/fold_two_stage.h), which the fused CUDA kernels run under
HSV_CUDA_FOLD=on. The folding is plain ATen code, so it is tested here on the
CPU: the folded factors must compute the same convolution as the originals
(through the op, in float64, and as rebuilt dense kernels), and the cache must
follow every factor a product was computed from.
"""
import pytest
import torch
from factories import CASES
from hsv_case import random_factors as hsv_random

import hsvkernels
from hsvkernels import formats

INFO = hsvkernels.build_info()
pytestmark = pytest.mark.skipif(not INFO.get("extension"), reason="needs the native extension")


def _C():
    from hsvkernels._extension import _C
    return _C


SHAPE = (24, 18, 3, 3)
# (kind, factor maker, folded kind, the folded rank as a function of the factors)
FOLDABLE = {
    "tucker2": (lambda shape, **kw: CASES["tucker2"].random(shape, **kw), "svd", lambda fs: fs[1].shape[0]),
    "ht2": (lambda shape, **kw: CASES["ht2"].random(shape, **kw), "svd", lambda fs: fs[2].shape[0]),
    "tt_tucker": (lambda shape, **kw: CASES["tt_tucker"].random(shape, **kw), "svd", lambda fs: fs[2].shape[0]),
    "cp": (lambda shape, **kw: CASES["cp"].random(shape, **kw), "svd", lambda fs: fs[0].shape[0]),
}
for _layout in ("q1", "q2", "q1q2"):
    FOLDABLE["hsv_" + _layout] = (
        # S1 = 1 and T2 = 2: the level-1 form the two-stage kernel runs (P*T2 = 2*rank)
        lambda shape, layout=_layout, **kw: hsv_random(shape, layout=layout, rank=5,
                                                       split=(shape[0] // 2, 1, 2, shape[1]), **kw),
        "hsv", lambda fs: 10)

GEOMETRIES = [
    # (N, H, W, kh, kw, stride, padding, dilation)
    (2, 9, 11, 3, 3, 1, 1, 1),
    (1, 12, 7, 3, 3, 2, 1, 1),
    (3, 10, 10, 3, 3, (2, 1), (0, 2), (1, 2)),
    (1, 8, 9, 1, 3, 1, (0, 1), 1),     # non-square kernel
    (2, 6, 6, 1, 1, 2, 0, 1),          # 1x1
    (0, 5, 5, 3, 3, 1, 1, 1),          # batch 0
]


def fold(fact, cache=True):
    return _C().fold_two_stage(list(fact.factors), fact.kind, cache)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=[str(i) for i in range(len(GEOMETRIES))])
@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_folded_factors_compute_the_same_conv(name, geom):
    make, folded_kind, rank = FOLDABLE[name]
    n, h, w, kh, kw, stride, padding, dilation = geom
    fact = make((SHAPE[0], SHAPE[1], kh, kw))
    kind, folded = fold(fact, cache=False)
    assert kind == folded_kind
    assert _C().fold_rank(list(fact.factors), fact.kind) == rank(fact.factors)
    dense = formats.get(fact.kind).to_dense(fact.factors)
    torch.testing.assert_close(formats.get(kind).to_dense(folded), dense, rtol=1e-12, atol=1e-12)
    x = torch.randn(n, SHAPE[1], h, w, dtype=torch.float64)
    bias = torch.randn(SHAPE[0], dtype=torch.float64)
    args = (bias, _pair(stride), _pair(padding), _pair(dilation), 1)
    y = torch.ops.hsv.conv2d(x, folded, *args, kind)
    y_ref = torch.ops.hsv.conv2d(x, list(fact.factors), *args, fact.kind)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    # the folded form runs as svd (V, U) or level-1 hsv (B, A): shapes the two-stage kernel reads
    if kind == "svd":
        assert folded[0].shape == (rank(fact.factors), SHAPE[1], kh, kw) and folded[1].shape == (SHAPE[0],
                                                                                                 rank(fact.factors))
    else:
        assert folded[0].dim() == 5 and folded[1].dim() == 3 and folded[1].shape[1] == 1


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_half_factors_fold_in_fp32_and_round_once(name, dtype):
    make, _, _ = FOLDABLE[name]
    fact = make(SHAPE, dtype=torch.float64)
    low = [f.to(dtype) for f in fact.factors]
    kind, folded = _C().fold_two_stage(low, fact.kind, False)
    _, from_fp32 = _C().fold_two_stage([f.float() for f in low], fact.kind, False)
    for got, want in zip(folded, from_fp32):
        assert got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, want.to(dtype))


@pytest.mark.parametrize("factors,kind", [
    (CASES["svd"].random(SHAPE).factors, "svd"),                       # already two-stage
    (hsv_random(SHAPE, layout="level1").factors, "hsv"),              # already two-stage
    (hsv_random(SHAPE, layout="q1q2").factors, "hsv"),                # S1 > 1 (default split)
    (CASES["kcp"].random(SHAPE).factors, "kcp"),
    (CASES["tt"].random(SHAPE).factors, "tt"),
    (CASES["tucker2"].random(SHAPE).factors[:2], "tucker2"),          # not tucker2's layout: no fold, no crash
    (CASES["ht2"].random(SHAPE).factors[1:], "ht2"),
    (CASES["cp"].random(SHAPE).factors, "no_such_kind"),
], ids=["svd", "hsv_level1", "hsv_s1", "kcp", "tt", "tucker2_short", "ht2_short", "unknown"])
def test_kinds_that_do_not_fold(factors, kind):
    assert _C().fold_rank(list(factors), kind) == 0
    assert _C().fold_two_stage(list(factors), kind) is None


@pytest.mark.parametrize("name", ["tucker2", "ht2", "cp", "hsv_q1q2"])
def test_cache_follows_every_factor(name):
    make, _, _ = FOLDABLE[name]
    factors = [f.float() for f in make(SHAPE).factors]
    kind_name = "hsv" if name.startswith("hsv") else name
    _C().clear_packed_cache()
    _, first = _C().fold_two_stage(factors, kind_name)
    _, again = _C().fold_two_stage(factors, kind_name)
    assert [a.data_ptr() for a in again] == [f.data_ptr() for f in first], "the second call did not hit the cache"
    for i in range(len(factors)):   # an in-place update of any one factor is seen
        factors[i].mul_(1.5)
        _, updated = _C().fold_two_stage(factors, kind_name)
        _, fresh = _C().fold_two_stage(factors, kind_name, False)
        for u, f in zip(updated, fresh):
            torch.testing.assert_close(u, f, rtol=0, atol=0)
    # a different tensor in a dependency's place (same values) is not taken for the old one
    _, before = _C().fold_two_stage(factors, kind_name)
    swapped = list(factors)
    swapped[-2] = factors[-2].clone()
    _, after = _C().fold_two_stage(swapped, kind_name)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(a.data_ptr() != b.data_ptr() for a, b in zip(after, before) if a.data_ptr() not in
               {f.data_ptr() for f in swapped}), "a swapped dependency returned the stale cached product"


def test_cache_entries_do_not_pile_up_while_training():
    # Every optimizer step changes the factors in place; each fold replaces its entry rather than adding one.
    factors = [f.float().requires_grad_() for f in CASES["tucker2"].random(SHAPE).factors]
    _C().clear_packed_cache()
    _C().fold_two_stage(factors, "tucker2")
    size = _C().packed_cache_size()
    for _ in range(5):
        with torch.no_grad():
            for f in factors:
                f.add_(0.01)
        _, folded = _C().fold_two_stage(factors, "tucker2")
        assert not folded[0].requires_grad, "the folded product should be a constant inside the kernel"
    assert _C().packed_cache_size() == size


def test_products_made_under_inference_mode_stay_cacheable():
    # The two-stage kernel caches its packed factors against the folded product, and never an inference
    # tensor: a product made under torch.inference_mode must be an ordinary tensor, and cached.
    factors = [f.float() for f in CASES["ht2"].random(SHAPE).factors]
    _C().clear_packed_cache()
    with torch.inference_mode():
        _, first = _C().fold_two_stage(factors, "ht2")
        _, again = _C().fold_two_stage(factors, "ht2")
    assert not first[0].is_inference()
    assert again[0].data_ptr() == first[0].data_ptr()


def test_entries_whose_dependency_is_gone_are_dropped():
    # A product whose dependency was freed can never match again: the cache drops it on its next scan
    # rather than keep it for as long as the primary factor lives.
    kept = [f.float() for f in CASES["tucker2"].random(SHAPE).factors]
    other = [f.float() for f in CASES["cp"].random(SHAPE).factors]
    _C().clear_packed_cache()
    _C().fold_two_stage(kept, "tucker2")    # V cached against the core, with U_S as its dependency
    del kept[0]                              # U_S freed; the core lives on
    _C().fold_two_stage(other, "cp")
    assert _C().packed_cache_size() == 1
