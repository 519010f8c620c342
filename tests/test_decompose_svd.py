"""decompose(..., "svd"): optimality, rank choice from ratio, argument checks."""
import numpy as np
import pytest
import torch

import hsvkernels
from hsvkernels.decompose.svd import rank_for_ratio

RESNET_SHAPES = [(64, 64, 3, 3), (128, 64, 3, 3), (256, 256, 3, 3), (512, 512, 3, 3), (256, 1024, 1, 1),
                 (64, 3, 7, 7), (2048, 512, 1, 1)]


def test_error_is_eckart_young_tail_and_matches_numpy():
    w = torch.randn(24, 8, 3, 3, dtype=torch.float64)
    s = np.linalg.svd(w.reshape(24, -1).numpy(), compute_uv=False)
    for r in (1, 5, 12, 24):
        fact = hsvkernels.decompose(w, "svd", rank=r)
        expected = np.sqrt((s[r:] ** 2).sum() / (s ** 2).sum())
        assert abs(fact.relative_error(w) - expected) < 1e-12
        assert abs(fact.meta["energy"] - (1 - expected ** 2)) < 1e-12


def test_error_monotone_in_rank():
    w = torch.randn(32, 16, 3, 3)
    errors = [hsvkernels.decompose(w, "svd", rank=r).relative_error(w) for r in (1, 2, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_synthetic_low_rank_recovered_exactly():
    u = torch.randn(32, 5, dtype=torch.float64)
    v = torch.randn(5, 16 * 9, dtype=torch.float64)
    w = (u @ v).reshape(32, 16, 3, 3)
    assert hsvkernels.decompose(w, "svd", rank=5).relative_error(w) < 1e-13


@pytest.mark.parametrize("shape", RESNET_SHAPES)
@pytest.mark.parametrize("ratio", [2, 4, 8])
def test_ratio_budget_met(shape, ratio):
    cout, cin, kh, kw = shape
    r = rank_for_ratio(shape, ratio)
    dense = cout * cin * kh * kw
    params = r * (cin * kh * kw + cout)
    assert dense / params >= ratio
    # r is the largest admissible rank: the next one (r + 1, or r + 8 once ranks are multiples of 8) misses it
    step = 8 if r >= 16 else 1
    assert dense / ((r + step) * (cin * kh * kw + cout)) < ratio


def test_ratio_picks_rank_and_factor_layout():
    w = torch.randn(64, 32, 3, 3)
    fact = hsvkernels.decompose(w, "svd", ratio=4)
    v, u = fact.factors
    assert v.shape == (fact.meta["rank"], 32, 3, 3) and u.shape == (64, fact.meta["rank"])
    assert v.dtype == w.dtype and fact.compression() >= 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "svd rank must be in"),
    (dict(rank=100), "svd rank must be in"),
    (dict(rank=2.5), "svd rank must be an int"),
    (dict(ratio=0.5), "ratio is a parameter compression"),
    (dict(ratio=1e6), "out of reach"),
    (dict(), "give rank= or ratio="),
    (dict(rank=2, ratio=2), "not both"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        hsvkernels.decompose(torch.randn(16, 4, 3, 3), "svd", **kwargs)


def test_bad_weights():
    with pytest.raises(ValueError, match="4-D"):
        hsvkernels.decompose(torch.randn(16, 4), "svd", rank=2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        hsvkernels.decompose(torch.full((4, 4, 3, 3), float("nan")), "svd", rank=2)
    with pytest.raises(ValueError, match="floating point"):
        hsvkernels.decompose(torch.ones(4, 4, 3, 3, dtype=torch.int32), "svd", rank=2)
    with pytest.raises(ValueError, match="unknown method"):
        hsvkernels.decompose(torch.randn(4, 4, 3, 3), "magic", rank=2)


def test_factorization_shape_checked():
    with pytest.raises(ValueError, match="does not match the factors"):
        hsvkernels.Factorization("svd", [torch.zeros(2, 4, 3, 3), torch.zeros(8, 2)], (8, 4, 3, 1))
