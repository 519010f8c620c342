"""The fused kcp CUDA kernel's CTA program (csrc/ops/kcp_cta_program.h), run on the
CPU by its emulator (kcp_cta_emulate.h). The CUDA kernel runs this same code, with
tensor-core tiles where the emulator has loops, so every tile, halo, padding and
buffer-reuse decision is checked here without a GPU: against float64 truth (the
dense conv of the rebuilt kernel and the reference chain), with the phases
between two barriers, and each phase's items, run forwards and backwards (bitwise
equal: no barrier is missing and no item depends on another of its phase), and
by the emulator's own checks of alignment, bounds and shared memory.
"""
import pytest
import torch
import torch.nn.functional as F
from factories import kcp_factors

import hsvkernels
from hsvkernels import reference

INFO = hsvkernels.build_info()
pytestmark = pytest.mark.skipif(not INFO.get("extension"), reason="needs the native extension")


def _C():
    from hsvkernels._extension import _C
    return _C


# (Q, N, S1, R, S2, T1, T2, kh, kw), stride, padding, dilation, input (B, H, W)
CASES = [
    ((1, 4, 2, 8, 16, 2, 16, 3, 3), 1, 1, 1, (2, 9, 11)),
    ((2, 3, 3, 5, 16, 3, 16, 3, 3), 2, 1, 1, (1, 12, 9)),        # odd ranks and sizes, stride 2
    ((1, 5, 2, 4, 16, 1, 16, 1, 1), 1, 0, 1, (2, 7, 6)),         # 1x1
    ((1, 4, 2, 6, 16, 2, 16, 1, 1), 2, 0, 1, (1, 9, 8)),         # 1x1 stride 2: taps skip rows and columns
    ((1, 2, 2, 3, 32, 2, 16, 3, 5), (1, 2), (1, 2), (2, 1), (1, 10, 13)),  # non-square, dilation
    ((3, 2, 1, 7, 16, 5, 32, 5, 3), 1, 0, 1, (1, 8, 8)),          # S1 = 1, no padding
    ((1, 17, 2, 4, 16, 1, 16, 3, 3), 1, 1, 1, (1, 5, 5)),        # QN = 17: two blocks, the last mostly padding
]


def _run(fact, x, stride, padding, dilation, bias=None, **kw):
    return _C().kcp_cta_emulate(x, fact.factors, bias, _pair(stride), _pair(padding), _pair(dilation), **kw)


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _truth(fact, x, stride, padding, dilation, bias=None):
    return F.conv2d(x.double(), fact.to_dense(), bias.double() if bias is not None else None, stride, padding,
                    dilation)


TOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2}  # of max |truth|: fp32 accumulation, intermediates rounded


@pytest.mark.parametrize("merged", [False, True], ids=["six", "merged"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_dense_conv_and_reference(case, dtype, merged):
    sizes, stride, padding, dilation, (b, h, w) = CASES[case]
    q, n, s1, r, s2, t1, t2, kh, kw = sizes
    fact = kcp_factors(*sizes, merged=merged, seed=case)
    x = torch.randn(b, s1 * s2, h, w, dtype=torch.float64)
    bias = torch.randn(t1 * t2, dtype=torch.float64)
    truth = _truth(fact, x, stride, padding, dilation, bias)
    # a small forced tile (several tiles per image, partial edge tiles) and the cost model's own
    for tile in ({"tile_h": 4, "tile_w": 4, "nb": 16}, {}):
        y = _run(fact.to(dtype=dtype), x.to(dtype), stride, padding, dilation, bias.to(dtype), **tile)
        assert y.dtype == dtype and y.shape == truth.shape
        err = (y.double() - truth).abs().max().item()
        assert err <= TOL[dtype] * truth.abs().max().item(), (tile, err)
    ref = reference.conv2d(x, fact, bias, stride, padding, dilation)
    torch.testing.assert_close(ref, truth, rtol=1e-9, atol=1e-9)


# kcp at ratio 4 / macs_ratio 4 on the layer suite (bench/suite.py): (Q, N, S1, R, S2, T1, T2), H = W, stride
SUITE = {"L1": ((1, 12, 4, 16, 16, 4, 16), 56, 1), "L2": ((1, 24, 8, 32, 16, 8, 16), 28, 1),
         "L3": ((1, 48, 8, 32, 32, 8, 32), 14, 1), "L3_s2": ((1, 48, 8, 32, 32, 8, 32), 28, 2),
         "L4": ((2, 64, 16, 48, 32, 16, 32), 7, 1)}


@pytest.mark.parametrize("layer", sorted(SUITE))
def test_layer_suite_shapes_at_the_tiles_the_model_picks(layer):
    # Full-size layers near the 227 KiB shared-memory limit, with the tile picked for batch 32 (forced) and for
    # batch 1 (the model's own, split where it has few tiles), run on one image: the emulator's bounds checks
    # see the real layouts.
    (q, n, s1, r, s2, t1, t2), h, stride = SUITE[layer]
    fact = kcp_factors(q, n, s1, r, s2, t1, t2, 3, 3, seed=h)
    bf = fact.to(dtype=torch.bfloat16).factors
    th, tw, nb, splits, smem = _C().kcp_cta_tile(torch.empty(32, s1 * s2, h, h, dtype=torch.bfloat16), bf,
                                                 [stride] * 2, [1, 1], [1, 1])
    assert smem <= 227 * 1024 and splits == 1   # batch 32 fills the H100 without splitting
    x = torch.randn(1, s1 * s2, h, h, dtype=torch.float64)
    truth = _truth(fact, x, stride, 1, 1)
    for tile in ({"tile_h": th, "tile_w": tw, "nb": nb}, {}):
        y = _run(fact.to(dtype=torch.bfloat16), x.bfloat16(), stride, 1, 1, **tile)
        err = (y.double() - truth).abs().max().item()
        assert err <= TOL[torch.bfloat16] * truth.abs().max().item(), (tile, err)


@pytest.mark.parametrize("merged", [False, True], ids=["six", "merged"])
def test_phases_between_barriers_are_independent(merged):
    # Backwards, a phase (or item) that reads another's write made since the last barrier sees the old value.
    sizes, stride, padding, dilation, (b, h, w) = CASES[1]
    fact = kcp_factors(*sizes, merged=merged).to(dtype=torch.float16)
    x = torch.randn(b, sizes[2] * sizes[4], h, w, dtype=torch.float16)
    for tile in ({"tile_h": 2, "tile_w": 8, "nb": 16}, {"tile_h": 4, "tile_w": 4, "nb": 32}):
        fwd = _run(fact, x, stride, padding, dilation, **tile)
        bwd = _run(fact, x, stride, padding, dilation, reverse=True, **tile)
        assert torch.equal(fwd, bwd)


@pytest.mark.parametrize("tile", [(1, 16, 16), (2, 8, 16), (4, 4, 32), (8, 8, 16), (4, 16, 16)])
def test_every_tile_shape_gives_the_same_answer(tile):
    sizes, stride, padding, dilation, (b, h, w) = CASES[0]
    fact = kcp_factors(*sizes).to(dtype=torch.bfloat16)
    x = torch.randn(b, sizes[2] * sizes[4], h, w, dtype=torch.bfloat16)
    base = _run(fact, x, stride, padding, dilation, tile_h=4, tile_w=4, nb=16)
    y = _run(fact, x, stride, padding, dilation, tile_h=tile[0], tile_w=tile[1], nb=tile[2])
    # same products, same rounding points; only the fp32 summation order of the last GEMM may differ
    torch.testing.assert_close(y, base, rtol=1e-2, atol=1e-2)


def test_channels_last_and_strided_inputs():
    sizes, stride, padding, dilation, (b, h, w) = CASES[0]
    fact = kcp_factors(*sizes).to(dtype=torch.float16)
    x = torch.randn(b, sizes[2] * sizes[4], h, w, dtype=torch.float16)
    base = _run(fact, x, stride, padding, dilation)
    cl = _run(fact, x.contiguous(memory_format=torch.channels_last), stride, padding, dilation)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, base)
    wide = torch.zeros(b, sizes[2] * sizes[4], h, 2 * w, dtype=torch.float16)
    wide[..., ::2] = x
    assert torch.equal(_run(fact, wide[..., ::2], stride, padding, dilation), base)


def test_batch_zero_and_one():
    sizes, stride, padding, dilation, (_, h, w) = CASES[0]
    fact = kcp_factors(*sizes).to(dtype=torch.float16)
    x = torch.randn(0, sizes[2] * sizes[4], h, w, dtype=torch.float16)
    assert _run(fact, x, stride, padding, dilation).shape == (0, sizes[5] * sizes[6], h, w)
    x1 = torch.randn(1, sizes[2] * sizes[4], h, w, dtype=torch.float16)
    x2 = torch.cat([x1, torch.randn_like(x1)])
    assert torch.equal(_run(fact, x1, stride, padding, dilation), _run(fact, x2, stride, padding, dilation)[:1])


def test_tile_choice_fits_and_prefers_fewer_wasted_pixels():
    # the 256-channel kcp layer of ResNet's layer 3 at ratio 4 (Q=1, N=64, S1=8, R=24, S2=32, T1=8, T2=32)
    fact = kcp_factors(1, 64, 8, 24, 32, 8, 32, 3, 3).to(dtype=torch.bfloat16)
    x = torch.empty(32, 256, 14, 14, dtype=torch.bfloat16)
    th, tw, nb, _, smem = _C().kcp_cta_tile(x, fact.factors, [1, 1], [1, 1], [1, 1])
    assert smem <= 227 * 1024 and (th * tw) % 16 == 0 and nb % 16 == 0
    # a smaller budget gives a smaller tile, and one that cannot hold any tile is refused
    smem2 = _C().kcp_cta_tile(x, fact.factors, [1, 1], [1, 1], [1, 1], smem_limit=smem - 1)[-1]
    assert smem2 < smem
    with pytest.raises(ValueError, match="no tile fits"):
        _C().kcp_cta_tile(x, fact.factors, [1, 1], [1, 1], [1, 1], smem_limit=1024)


def test_split_blocks_match_the_unsplit_answer():
    # QN = 2 * 32: four blocks of 16 over 1, 2, 3 (two blocks, one block, one block) and 4 CTAs per tile
    sizes = (2, 32, 2, 8, 16, 2, 16, 3, 3)
    fact = kcp_factors(*sizes).to(dtype=torch.bfloat16)
    x = torch.randn(1, 32, 9, 10, dtype=torch.bfloat16)
    bias = torch.randn(32, dtype=torch.bfloat16)
    base = _run(fact, x, 1, 1, 1, bias, tile_h=4, tile_w=4, nb=16, splits=1)
    for splits in (2, 3, 4, 9):   # 9: more than the blocks, clamped to 4
        y = _run(fact, x, 1, 1, 1, bias, tile_h=4, tile_w=4, nb=16, splits=splits)
        # the same products; only where the fp32 partial sums meet differs
        torch.testing.assert_close(y, base, rtol=1e-2, atol=1e-2)
        rev = _run(fact, x, 1, 1, 1, bias, tile_h=4, tile_w=4, nb=16, splits=splits, reverse=True)
        assert torch.equal(rev, y)
    with pytest.raises(ValueError, match="split count must not be negative"):
        _run(fact, x, 1, 1, 1, tile_h=4, tile_w=4, nb=16, splits=-1)
    torch.testing.assert_close(_run(fact, x, 1, 1, 1, bias, tile_h=4, tile_w=4, nb=16, splits=0), base)


def test_few_tiles_are_split_and_many_are_not():
    # layer4 at ratio 4 (7 x 7, 8 blocks of 16 qn): batch 1 has 4 tiles for 132 SMs, batch 32 has 128
    (q, n, s1, r, s2, t1, t2), h, stride = SUITE["L4"]
    bf = kcp_factors(q, n, s1, r, s2, t1, t2, 3, 3).to(dtype=torch.bfloat16).factors
    one = _C().kcp_cta_tile(torch.empty(1, s1 * s2, h, h, dtype=torch.bfloat16), bf, [1, 1], [1, 1], [1, 1])
    many = _C().kcp_cta_tile(torch.empty(32, s1 * s2, h, h, dtype=torch.bfloat16), bf, [1, 1], [1, 1], [1, 1])
    assert one[3] > 1 and many[3] == 1, (one, many)


@pytest.mark.parametrize("what, change, match", [
    ("fp32", lambda f, x: (f.to(dtype=torch.float32), x.float()), "fp16/bf16"),
    ("S2 = 12", lambda f, x: (kcp_factors(1, 4, 2, 8, 12, 2, 16, 3, 3).to(dtype=torch.float16),
                              torch.zeros(1, 24, 6, 6, dtype=torch.float16)), "S2 is not a multiple of 16"),
    ("T2 = 8", lambda f, x: (kcp_factors(1, 4, 2, 8, 16, 2, 8, 3, 3).to(dtype=torch.float16), x),
     "T2 is not a multiple of 16"),
])
def test_arguments_the_kernel_does_not_take_are_refused(what, change, match):
    fact = kcp_factors(1, 4, 2, 8, 16, 2, 16, 3, 3).to(dtype=torch.float16)
    x = torch.zeros(1, 32, 6, 6, dtype=torch.float16)
    fact, x = change(fact, x)
    with pytest.raises(ValueError, match=match):
        _run(fact, x, 1, 1, 1)


def test_bad_forced_tiles_are_refused():
    fact = kcp_factors(1, 4, 2, 8, 16, 2, 16, 3, 3).to(dtype=torch.float16)
    x = torch.zeros(1, 32, 6, 6, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiples of 16"):
        _run(fact, x, 1, 1, 1, tile_h=3, tile_w=3, nb=16)
    with pytest.raises(ValueError, match="too many taps"):
        _run(fact, x, 1, 1, 1, tile_h=32, tile_w=1, nb=16)
    # bad factors or input are make_plan's errors, naming the argument
    bad = list(fact.factors)
    bad[1] = bad[1][:2]
    with pytest.raises(ValueError, match=r"factors\[1\]"):
        _C().kcp_cta_emulate(x, bad, None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="input has 16 channels"):
        _run(fact, x[:, :16], 1, 1, 1)
    with pytest.raises(ValueError, match="CPU tensor"):
        _run(fact, x.to("meta"), 1, 1, 1)
