"""Per-kind test fixtures: how to get factors of each kind for a given dense shape.

Every kind registered here runs through the whole op test matrix (test_op.py,
test_autograd.py). A new kind adds one KindCase.
"""
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

import hsv_case

import hsvkernels
from hsvkernels import Factorization


@dataclass
class KindCase:
    # random factors for a dense shape (Cout, Cin, kh, kw); not a decomposition of anything
    random: Callable
    # a decomposition of `weight` that reproduces it exactly (full rank)
    full_rank: Callable
    # whether the kind can represent this dense shape (e.g. channel counts that factor)
    supports: Callable = lambda shape: True


def _svd_random(shape, dtype=torch.float64, device="cpu"):
    cout, cin, kh, kw = shape
    r = max(1, min(cout, cin * kh * kw) // 2)
    v = torch.randn(r, cin, kh, kw, dtype=dtype, device=device) / (cin * kh * kw) ** 0.5
    u = torch.randn(cout, r, dtype=dtype, device=device) / r ** 0.5
    return Factorization("svd", [v, u], shape)


def _svd_full(weight):
    cout, cin, kh, kw = weight.shape
    return hsvkernels.decompose(weight, "svd", rank=min(cout, cin * kh * kw))


def _randn(*shape, dtype, device, fan_in):
    return torch.randn(*shape, dtype=dtype, device=device) / fan_in ** 0.5


def _tucker2_random(shape, dtype=torch.float64, device="cpu"):
    cout, cin, kh, kw = shape
    rt, rs = max(1, cout // 2), max(1, cin // 2)
    us = _randn(rs, cin, dtype=dtype, device=device, fan_in=cin)
    core = _randn(rt, rs, kh, kw, dtype=dtype, device=device, fan_in=rs * kh * kw)
    ut = _randn(cout, rt, dtype=dtype, device=device, fan_in=rt)
    return Factorization("tucker2", [us, core, ut], shape)


def _cp_random(shape, dtype=torch.float64, device="cpu", rank=None):
    cout, cin, kh, kw = shape
    r = rank or max(2, min(cin, cout))
    a_s = _randn(r, cin, dtype=dtype, device=device, fan_in=cin)
    a_h = _randn(r, kh, dtype=dtype, device=device, fan_in=kh)
    a_w = _randn(r, kw, dtype=dtype, device=device, fan_in=kw)
    a_t = _randn(cout, r, dtype=dtype, device=device, fan_in=r)
    return Factorization("cp", [a_s, a_h, a_w, a_t], shape)


def _separable_random(kind):
    def make(shape, dtype=torch.float64, device="cpu", r3=None):
        cout, cin, kh, kw = shape
        r1, r13, r3 = max(1, cin // 2), max(1, (cin + cout) // 3), r3 or max(1, cout // 2)
        u1 = _randn(r1, cin, dtype=dtype, device=device, fan_in=cin)
        g1 = _randn(r13, r1, kh, dtype=dtype, device=device, fan_in=r1 * kh)
        g2 = _randn(r3, r13, kw, dtype=dtype, device=device, fan_in=r13 * kw)
        u3 = _randn(cout, r3, dtype=dtype, device=device, fan_in=r3)
        return Factorization(kind, [u1, g1, g2, u3], shape)
    return make


def _full(method):
    def make(weight):
        from hsvkernels.decompose import cp, ht2, tt_tucker, tucker2
        shape = tuple(weight.shape)
        rank = {"tucker2": tucker2.max_ranks, "ht2": ht2.max_ranks, "tt_tucker": tt_tucker.max_ranks,
                "cp": cp.max_rank}[method](shape)
        return hsvkernels.decompose(weight, method, rank=rank)
    return make


def _kcp_random(shape, dtype=torch.float64, device="cpu", merged=False):
    from hsvkernels.decompose import kcp
    split = kcp.default_splits(*shape[:2])[0]
    n_max, r_max, q_max = kcp.bounds(shape, split)
    rank = (min(2, n_max), min(3, r_max), min(2, q_max))
    factors = [torch.randn(s, dtype=dtype, device=device) for s in kcp.factor_shapes(shape, split, rank, merged)]
    return Factorization("kcp", factors, shape)


def kcp_factors(q, n, s1, r, s2, t1, t2, kh, kw, merged=False, seed=0):
    """float64 kcp factors whose chain keeps activations near unit scale."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, fan):
        return torch.randn(*shape, generator=g, dtype=torch.float64) / fan ** 0.5

    fs = [rnd(q, n, s1, fan=s1), rnd(n, r, s2, fan=s2), rnd(n, r, kh, fan=kh), rnd(n, r, kw, fan=kw)]
    if merged:
        fs.append(rnd(t1 * t2, q, n, r, fan=q * n * r))
    else:
        fs += [rnd(n, t2, r, fan=r), rnd(t1, q, n, fan=q * n)]
    return hsvkernels.Factorization("kcp", fs, (t1 * t2, s1 * s2, kh, kw))


def _kcp_full(weight):
    from hsvkernels.decompose import kcp
    split = kcp.default_splits(*weight.shape[:2])[0]
    return hsvkernels.decompose(weight, "kcp", rank=kcp.bounds(weight.shape, split), split=split)


def _tt_random(shape, dtype=torch.float64, device="cpu"):
    from hsvkernels.decompose import tt
    out_modes, in_modes = tt.channel_modes(shape)
    ranks = tuple(min(3, b) for b in tt.rank_bounds(shape, out_modes, in_modes))
    shapes = tt.factor_shapes(shape, out_modes, in_modes, ranks)
    # Each G_k contracts (S_k, r_k) and K the kernel window: dense entries of about 1/sqrt(Cin*kh*kw).
    factors = [_randn(*s, dtype=dtype, device=device, fan_in=s[2] * s[3]) for s in shapes[:-1]]
    factors.append(_randn(*shapes[-1], dtype=dtype, device=device, fan_in=shape[2] * shape[3]))
    return Factorization("tt", factors, shape)


def _tt_full(weight):
    from hsvkernels.decompose import tt
    shape = tuple(weight.shape)
    return hsvkernels.decompose(weight, "tt", rank=max(tt.rank_bounds(shape, *tt.channel_modes(shape))))


CASES = {
    "svd": KindCase(_svd_random, _svd_full),
    "tucker2": KindCase(_tucker2_random, _full("tucker2")),
    "cp": KindCase(_cp_random, _full("cp")),
    "ht2": KindCase(_separable_random("ht2"), _full("ht2")),
    "tt_tucker": KindCase(_separable_random("tt_tucker"), _full("tt_tucker")),
    "hsv": KindCase(hsv_case.random_factors, hsv_case.full_rank),
    "kcp": KindCase(_kcp_random, _kcp_full),
    "tt": KindCase(_tt_random, _tt_full),
}

KINDS = sorted(k for k in CASES if k in hsvkernels.FORMATS)


def assert_flops_match_macs(fact, x, stride, padding):
    """torch.utils.flop_counter on the op, and on the reference path, counts 2 FLOPs per MAC of fact.macs."""
    with FlopCounterMode(display=False) as counter:
        y = hsvkernels.conv2d(x, fact, None, stride, padding)
    assert counter.get_total_flops() == 2 * x.shape[0] * fact.macs(y.shape[2], y.shape[3], x.shape[2], x.shape[3])
    with FlopCounterMode(display=False) as counter_ref:
        hsvkernels.reference.conv2d(x, fact, None, stride, padding)
    assert counter_ref.get_total_flops() == counter.get_total_flops()


def draw_conv_geometry(draw, *, kernel=4, stride=3, padding=2, size=12, batch=3):
    """A hypothesis draw of one valid conv geometry: (n, h, w, kh, kw, stride, padding, dilation),
    the input at least as large as the dilated kernel after padding; the arguments bound each draw."""
    from hypothesis import strategies as st

    kh, kw = draw(st.integers(1, kernel)), draw(st.integers(1, kernel))
    sh, sw = draw(st.integers(1, stride)), draw(st.integers(1, stride))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, padding)), draw(st.integers(0, padding))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), size))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), size))
    n = draw(st.integers(0, batch))
    return n, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw)
