"""The fused CUDA forward (HSV_CUDA_IMPL=fused) against the composite chain, the
reference path and F.conv2d on the dense weight rebuilt from the same factors.

Skipped without a CUDA device or without CUDA kernels in the extension. Every
test that expects the fused kernel to run checks the extension's launch counter,
so a silent fallback to the composite chain cannot pass for a fused run.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from factories import CASES, KINDS, draw_conv_geometry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_op import SHAPES

import hsvkernels
from hsvkernels import reference

INFO = hsvkernels.build_info()
pytestmark = [
    requires_cuda,
    pytest.mark.cuda,
    pytest.mark.skipif(not INFO.get("with_cuda"), reason="the native extension was built without CUDA kernels"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative max error against float64 truth: fp32 runs in TF32 (as cuDNN does by
# default); half types round their operands and the rank-r intermediate.
TOL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
LAYOUTS = ["contiguous", "channels_last", "noncontiguous", "channels_last_noncontiguous"]


def launches():
    from hsvkernels._extension import _C
    return _C.cuda_fused_launch_count()


def nhwc_launches():
    from hsvkernels._extension import _C
    return _C.cuda_nhwc_launch_count()


def mma_launches():
    from hsvkernels._extension import _C
    return _C.cuda_mma_launch_count()


def wgmma_launches():
    from hsvkernels._extension import _C
    return _C.cuda_wgmma_launch_count()


def is_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def has_wgmma():
    """The wgmma kernel can run: sm_90a code in the build and a compute capability 9.x device."""
    return bool(INFO.get("cuda_sm90a")) and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def skip_without_wgmma():
    if not has_wgmma():
        pytest.skip("the wgmma kernel needs sm_90a code (cuda_sm90a=%s) and a compute capability 9.x device"
                    % INFO.get("cuda_sm90a"))


@pytest.fixture(params=["mma", "wmma", "wgmma"])
def nhwc_kernel(request, monkeypatch):
    """Which channels_last kernel runs (HSV_CUDA_NHWC); yields a checker that the
    launch counters moved as that kernel predicts for `calls` launches."""
    kernel = request.param
    if kernel == "mma" and not is_hopper():
        pytest.skip("the mma.sync kernel needs compute capability 9.0 (thread-block clusters)")
    if kernel == "wgmma":
        skip_without_wgmma()
    monkeypatch.setenv("HSV_CUDA_NHWC", kernel)
    start = (nhwc_launches(), mma_launches(), wgmma_launches())

    def check(calls=1):
        nhwc, mma, wg = (nhwc_launches() - start[0], mma_launches() - start[1], wgmma_launches() - start[2])
        assert nhwc == calls, "the channels_last fast path did not run"
        assert mma == (calls if kernel == "mma" else 0), "HSV_CUDA_NHWC=%s ran the mma kernel" % kernel
        assert wg == (calls if kernel == "wgmma" else 0), "HSV_CUDA_NHWC=%s ran the wgmma kernel" % kernel
    return check


@pytest.fixture
def impl(monkeypatch):
    """impl("fused") / impl("composite"): the CUDA forward the next calls take (read per call)."""
    def set_impl(value):
        monkeypatch.setenv("HSV_CUDA_IMPL", value)
    return set_impl


@pytest.fixture(autouse=True)
def _tf32_on():
    # The fused fp32 path computes in TF32 and runs only where cuDNN may too.
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32 = saved


def make_input(n, cin, h, w, layout, dtype):
    # made on the device: .to() would turn a strided view into a dense copy
    opts = dict(device="cuda", dtype=dtype)
    if layout == "channels_last":
        return torch.randn(n, cin, h, w, **opts).contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        return torch.randn(n, cin, h, 2 * w, **opts)[..., ::2]
    if layout == "channels_last_noncontiguous":
        return torch.randn(n, h, 2 * w, cin, **opts).permute(0, 3, 1, 2)[..., ::2]
    return torch.randn(n, cin, h, w, **opts)


def expected_format(x):
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def rel_err(y, ref):
    if ref.numel() == 0:
        return 0.0
    y, ref = y.double().cpu(), ref.double().cpu()
    assert torch.isfinite(y).all(), "non-finite output (an element left unwritten?)"
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def poison_allocator(numel, dtype):
    """Leaves a NaN-filled block in the caching allocator, which the op's output
    is likely to reuse: an element the kernel never writes then shows as NaN."""
    junk = torch.full((max(numel, 1),), float("nan"), dtype=dtype, device="cuda")
    del junk


def svd_factors(r, cin, cout, kh, kw, dtype=torch.float64):
    v = torch.randn(r, cin, kh, kw, dtype=dtype) / (cin * kh * kw) ** 0.5
    u = torch.randn(cout, r, dtype=dtype) / r ** 0.5
    return hsvkernels.Factorization("svd", [v, u], (cout, cin, kh, kw))


def check_fused(impl, fact, x, bias, stride, padding, dilation, expect_fused=True):
    """Runs fused and composite on x; both against float64 truth and each other."""
    dtype = x.dtype
    truth = F.conv2d(x.double().cpu(), fact.to_dense().double(), None if bias is None else bias.double(), stride,
                     padding, dilation)
    fd = fact.to("cuda", dtype)
    bd = None if bias is None else bias.to("cuda", dtype)
    impl("composite")
    y_comp = hsvkernels.conv2d(x, fd, bd, stride, padding, dilation)
    impl("fused")
    poison_allocator(truth.numel(), dtype)
    before = launches()
    y = hsvkernels.conv2d(x, fd, bd, stride, padding, dilation)
    torch.cuda.synchronize()
    ran = launches() - before
    if expect_fused and x.shape[0] > 0:
        assert ran == 1, "the fused kernel did not run (fallback to the composite chain)"
    elif not expect_fused:
        assert ran == 0, "the fused kernel ran where it should have fallen back"
    assert y.shape == truth.shape and y.dtype == dtype and y.device.type == "cuda"
    assert y.is_contiguous(memory_format=expected_format(x))
    # Where cancellation leaves the result small against its terms (a single
    # output element, say) half-precision rounding of the operands alone exceeds
    # TOL; there the fused kernel must be no worse than twice the composite
    # chain, which rounds the same operands.
    err_comp = rel_err(y_comp, truth)
    assert rel_err(y, truth) <= max(TOL[dtype], 2 * err_comp)
    assert rel_err(y, y_comp.double()) <= max(TOL[dtype], 3 * err_comp)
    return y


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
def test_fused_svd_matches_dense_and_composite(spec, dtype, layout, impl):
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
    fact = CASES["svd"].random((cout, cin, kh, kw), dtype=torch.float64)
    x = make_input(n, cin, h, w, layout, dtype)
    bias = torch.randn(cout, dtype=torch.float64)
    y = check_fused(impl, fact, x, bias, stride, padding, dilation)
    # and the reference path (pure PyTorch) on the same factors
    y_ref = reference.conv2d(x, fact.to("cuda", dtype), bias.to("cuda", dtype), stride, padding, dilation)
    assert rel_err(y, y_ref.double()) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", [
    # (N, Cin, Cout, r, H, W, kh, kw, stride, padding, dilation)
    (2, 40, 70, 35, 13, 11, 3, 3, 1, 1, 1),      # r, Cout and K = 360 off every tile multiple
    (1, 64, 128, 128, 9, 10, 3, 3, 1, 1, 1),     # the rank limit, two Cout chunks
    (3, 17, 5, 1, 8, 9, 3, 3, 2, 1, 1),          # rank 1, Cout 5, odd Cin
    (2, 256, 96, 48, 7, 7, 1, 1, 1, 0, 1),       # 1x1, K a multiple of the K step
    (1, 8, 16, 8, 33, 65, 3, 3, 1, 1, 1),        # many pixel tiles, a partial last one
    (4, 3, 64, 16, 23, 23, 7, 7, 2, 3, 1),       # stem-like 7x7 stride 2, Cin 3
    (2, 16, 24, 12, 12, 14, 3, 2, (2, 1), (2, 0), (3, 2)),  # non-square kernel, mixed stride/padding/dilation
], ids=["offsizes", "rank128", "rank1", "1x1", "tiles", "stem", "mixed"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_fused_svd_ranks_and_tiles(spec, dtype, with_bias, impl):
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation = spec
    fact = svd_factors(r, cin, cout, kh, kw)
    bias = torch.randn(cout, dtype=torch.float64) if with_bias else None
    for layout in ("contiguous", "channels_last"):
        x = make_input(n, cin, h, w, layout, dtype)
        check_fused(impl, fact, x, bias, stride, padding, dilation)


@pytest.mark.parametrize("splits", ["1", "2", "3", "7", "1000"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", [
    # (N, Cin, Cout, r, H, W, kh, kw, stride, padding, dilation)
    (1, 40, 70, 35, 13, 11, 3, 3, 1, 1, 1),      # K 360: 12 K steps
    (1, 64, 128, 112, 7, 7, 3, 3, 1, 1, 1),      # an L4-like 7x7 layer at batch 1
    (2, 17, 9, 5, 10, 9, 3, 3, 2, 1, 1),         # K 153: 5 K steps, Cout < 16
], ids=["k360", "l4like", "small"])
def test_fused_split_k(spec, dtype, splits, impl, monkeypatch):
    # forced split counts (clamped to the K steps): the parts' sum must equal the whole
    monkeypatch.setenv("HSV_CUDA_SPLIT_K", splits)
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation = spec
    fact = svd_factors(r, cin, cout, kh, kw)
    for with_bias in (True, False):
        bias = torch.randn(cout, dtype=torch.float64) if with_bias else None
        for layout in ("contiguous", "channels_last"):
            x = make_input(n, cin, h, w, layout, dtype)
            check_fused(impl, fact, x, bias, stride, padding, dilation)


# The channels_last fast path (two_stage_nhwc.cu): fp16/bf16, Cin % 32 == 0,
# Cout % 8 == 0, a channels_last output; rank padded to 16, 32, 64 or 128.
NHWC_SPECS = [
    # (N, Cin, Cout, r, H, W, kh, kw, stride, padding, dilation)
    (2, 64, 64, 14, 14, 14, 3, 3, 1, 1, 1),       # rank 14 -> 16, one rank tile
    (3, 32, 40, 24, 9, 11, 3, 3, 2, 1, 1),        # rank 24 -> 32, stride 2, Cout 40 (part of a 64 chunk)
    (1, 128, 128, 56, 7, 7, 3, 3, 1, 1, 1),       # rank 56 -> 64 at batch 1 (split-K by the model)
    (2, 64, 136, 112, 10, 9, 3, 3, 1, 1, 1),      # rank 112 -> 128, Cout 136: three chunks
    (1, 96, 200, 48, 5, 6, 1, 1, 1, 0, 1),        # 1x1
    (2, 32, 16, 33, 12, 12, 3, 2, (2, 1), (2, 0), (3, 2)),  # non-square kernel, mixed stride/padding/dilation
    (20, 32, 64, 16, 30, 30, 3, 3, 1, 1, 1),      # 18000 pixels: two pixel tiles per warp on a 132-SM GPU
    (3, 32, 8, 1, 5, 4, 5, 5, 1, 2, 1),           # rank 1, a 5x5 kernel larger than the image
]
NHWC_IDS = ["r16", "r32_s2", "r64_b1", "r128", "1x1", "mixed", "mf2", "rank1_5x5"]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", NHWC_SPECS, ids=NHWC_IDS)
def test_fused_nhwc_path(spec, dtype, with_bias, impl, nhwc_kernel):
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation = spec
    fact = svd_factors(r, cin, cout, kh, kw)
    bias = torch.randn(cout, dtype=torch.float64) if with_bias else None
    x = make_input(n, cin, h, w, "channels_last", dtype)
    check_fused(impl, fact, x, bias, stride, padding, dilation)
    nhwc_kernel()


@pytest.mark.parametrize("splits", ["1", "2", "3", "5", "8", "1000"])
@pytest.mark.parametrize("spec", [NHWC_SPECS[2], NHWC_SPECS[3], NHWC_SPECS[5]], ids=["r64_b1", "r128", "mixed"])
def test_fused_nhwc_split_k(spec, splits, impl, monkeypatch, nhwc_kernel):
    # the mma kernel splits K over a cluster of at most 8 CTAs (1000 -> 8, or fewer where K is short)
    monkeypatch.setenv("HSV_CUDA_SPLIT_K", splits)
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation = spec
    fact = svd_factors(r, cin, cout, kh, kw)
    for bias in (torch.randn(cout, dtype=torch.float64), None):
        check_fused(impl, fact, make_input(n, cin, h, w, "channels_last", torch.bfloat16), bias, stride, padding,
                    dilation)
    nhwc_kernel(2)


# Every (padded rank, pixel fragments per warp, K step) the mma kernel
# instantiates, each alone and split over a cluster, on a shape with a partial
# last tile, padding taps, a partial last 64-channel chunk and more chunks than
# CTAs; Cin 96 cannot take 64-channel K steps and must fall back to 32.
@pytest.mark.parametrize("splits", ["1", "3", "8"])
@pytest.mark.parametrize("ks", ["32", "64"])
@pytest.mark.parametrize("mi", ["1", "2"])
@pytest.mark.parametrize("rank,cin", [(9, 64), (32, 64), (50, 96), (128, 64)])
def test_fused_mma_tiles(rank, cin, mi, ks, splits, impl, monkeypatch):
    if not is_hopper():
        pytest.skip("the mma.sync kernel needs compute capability 9.0 (thread-block clusters)")
    monkeypatch.setenv("HSV_CUDA_NHWC", "mma")
    monkeypatch.setenv("HSV_CUDA_MMA_MI", mi)
    monkeypatch.setenv("HSV_CUDA_MMA_KSTEP", ks)
    monkeypatch.setenv("HSV_CUDA_SPLIT_K", splits)
    monkeypatch.setenv("HSV_CUDA_MMA_HALO", "0")   # the per-tap gather (input blocks: test_fused_mma_halo)
    fact = svd_factors(rank, cin, 200, 3, 3)
    bias = torch.randn(200, dtype=torch.float64)
    x = make_input(3, cin, 13, 11, "channels_last", torch.bfloat16)
    before = mma_launches()
    check_fused(impl, fact, x, bias, 1, 1, 1)
    assert mma_launches() - before == 1
    # the forced settings took effect: the K step where Cin allows it, the
    # split to a cluster of <= 8 CTAs that each get K steps
    from hsvkernels._extension import _C
    want_ks = int(ks) if cin % int(ks) == 0 else 32
    k_steps = 9 * cin // want_ks
    per = -(-k_steps // min(int(splits), 8))
    tiles = -(-3 * 13 * 11 // (64 * int(mi)))
    assert list(_C.cuda_mma_last_config()) == [int(mi), -(-k_steps // per), tiles, want_ks, 0, 0, 0]


# The mma kernel with input blocks (HSV_CUDA_MMA_HALO): a CTA's pixels are a
# block of one image whose input channels are loaded once per chunk for all
# taps. Every (rank class, MI, K step), whole and split over a cluster (by
# channel chunks), on geometries where blocks end inside the image, cross no
# image boundary, overhang both edges, and read strided or dilated taps.
HALO_GEOMETRIES = [
    # (N, H, W, kh, kw, stride, padding, dilation)
    (3, 13, 11, 3, 3, 1, 1, 1),          # blocks end inside the image in both directions
    (2, 30, 30, 3, 3, 1, 1, 1),          # several blocks per row (balanced widths)
    (1, 5, 4, 5, 5, 1, 2, 1),            # 5x5 kernel larger than the image
    (2, 17, 9, 3, 3, 2, 1, 1),           # stride 2: the block's input rows step by 2
    (2, 12, 14, 3, 2, (2, 1), (2, 0), (3, 2)),  # non-square kernel, mixed stride/padding/dilation
    (1, 1, 40, 1, 7, 1, (0, 3), 1),      # a 1-row image, a 1x7 kernel
]
HALO_IDS = ["13x11", "30x30", "5x5k", "s2", "mixed", "1x7"]


@pytest.mark.parametrize("splits", ["1", "3"])
@pytest.mark.parametrize("ks", ["32", "64"])
@pytest.mark.parametrize("mi", ["1", "2"])
@pytest.mark.parametrize("rank,cin", [(9, 64), (32, 64), (50, 96), (128, 128)])
@pytest.mark.parametrize("geom", HALO_GEOMETRIES, ids=HALO_IDS)
def test_fused_mma_halo(geom, rank, cin, mi, ks, splits, impl, monkeypatch):
    if not is_hopper():
        pytest.skip("the mma.sync kernel needs compute capability 9.0 (thread-block clusters)")
    n, h, w, kh, kw, stride, padding, dilation = geom
    monkeypatch.setenv("HSV_CUDA_NHWC", "mma")
    monkeypatch.setenv("HSV_CUDA_MMA_MI", mi)
    monkeypatch.setenv("HSV_CUDA_MMA_KSTEP", ks)
    monkeypatch.setenv("HSV_CUDA_SPLIT_K", splits)
    monkeypatch.setenv("HSV_CUDA_MMA_HALO", "1")
    fact = svd_factors(rank, cin, 136, kh, kw)
    bias = torch.randn(136, dtype=torch.float64)
    x = make_input(n, cin, h, w, "channels_last", torch.bfloat16)
    before = mma_launches()
    y = check_fused(impl, fact, x, bias, stride, padding, dilation)
    assert mma_launches() - before == 1
    from hsvkernels._extension import _C
    got_mi, got_splits, tiles, got_ks, halo, tile_h, tile_w = _C.cuda_mma_last_config()
    assert halo == 1, "HSV_CUDA_MMA_HALO=1 did not take input blocks"
    want_ks = int(ks) if cin % int(ks) == 0 else 32
    chunks = cin // want_ks
    assert (got_mi, got_ks) == (int(mi), want_ks)
    assert got_splits == -(-chunks // -(-chunks // min(int(splits), 8)))   # whole chunks per CTA
    # the blocks fit their slots and cover every output position exactly once
    ho, wo = y.shape[2], y.shape[3]
    assert 0 < tile_h * tile_w <= 64 * int(mi) and tile_h <= ho and tile_w <= wo
    assert tiles == n * -(-ho // tile_h) * -(-wo // tile_w)
    # the same call through the per-tap gather: the same function (different summation order)
    monkeypatch.setenv("HSV_CUDA_MMA_HALO", "0")
    y0 = hsvkernels.conv2d(x, fact.to("cuda", torch.bfloat16), bias.to("cuda", torch.bfloat16), stride, padding,
                           dilation)
    assert _C.cuda_mma_last_config()[4] == 0
    assert rel_err(y, y0.double()) <= TOL[torch.bfloat16]


# Every (padded rank, warpgroups per CTA, K step) the wgmma kernel
# instantiates, each alone and split over a cluster, on shapes with a partial
# last pixel tile, padding taps, a partial last 64-channel output chunk and
# more chunks than CTAs; Cin 96 cannot take 64-channel K steps and falls back
# to 32. Against float64 truth and the composite chain (check_fused), and
# against the mma kernel on the same call.
@pytest.mark.parametrize("splits", ["1", "3", "8"])
@pytest.mark.parametrize("ks", ["32", "64"])
@pytest.mark.parametrize("wg", ["1", "2"])
@pytest.mark.parametrize("rank,cin", [(9, 64), (32, 64), (50, 96), (128, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_wgmma_tiles(dtype, rank, cin, wg, ks, splits, impl, monkeypatch):
    skip_without_wgmma()
    monkeypatch.setenv("HSV_CUDA_NHWC", "wgmma")
    monkeypatch.setenv("HSV_CUDA_WGMMA_WG", wg)
    monkeypatch.setenv("HSV_CUDA_MMA_KSTEP", ks)
    monkeypatch.setenv("HSV_CUDA_SPLIT_K", splits)
    fact = svd_factors(rank, cin, 200, 3, 3)
    bias = torch.randn(200, dtype=torch.float64)
    x = make_input(3, cin, 13, 11, "channels_last", dtype)
    before = wgmma_launches()
    y = check_fused(impl, fact, x, bias, 1, 1, 1)
    assert wgmma_launches() - before == 1
    from hsvkernels._extension import _C
    want_ks = int(ks) if cin % int(ks) == 0 else 32
    k_steps = 9 * cin // want_ks
    per = -(-k_steps // min(int(splits), 8))
    tiles = -(-3 * 13 * 11 // (64 * int(wg)))
    assert list(_C.cuda_wgmma_last_config()) == [int(wg), -(-k_steps // per), tiles, want_ks]
    monkeypatch.setenv("HSV_CUDA_NHWC", "mma")
    monkeypatch.setenv("HSV_CUDA_MMA_HALO", "0")
    y_mma = hsvkernels.conv2d(x, fact.to("cuda", dtype), bias.to("cuda", dtype), 1, 1, 1)
    assert rel_err(y, y_mma.double()) <= TOL[dtype]


@pytest.mark.parametrize("geom", HALO_GEOMETRIES + [(40, 28, 28, 3, 3, 1, 1, 1)], ids=HALO_IDS + ["many_tiles"])
def test_fused_wgmma_geometries(geom, impl, monkeypatch):
    # the per-tap gather on every geometry the mma kernel's input blocks are tested on, plus a grid of
    # more pixel tiles than SMs (the auto rule's two warpgroups per CTA)
    skip_without_wgmma()
    n, h, w, kh, kw, stride, padding, dilation = geom
    monkeypatch.setenv("HSV_CUDA_NHWC", "wgmma")
    fact = svd_factors(56, 128, 136, kh, kw)
    for bias in (torch.randn(136, dtype=torch.float64), None):
        before = wgmma_launches()
        check_fused(impl, fact, make_input(n, 128, h, w, "channels_last", torch.bfloat16), bias, stride, padding,
                    dilation)
        assert wgmma_launches() - before == 1


def test_wgmma_request_without_sm90a_errors(impl, monkeypatch):
    # HSV_CUDA_NHWC=wgmma where the kernel cannot run is an error that says why, not a silent fallback
    if has_wgmma():
        pytest.skip("this build and device run the wgmma kernel")
    impl("fused")
    monkeypatch.setenv("HSV_CUDA_NHWC", "wgmma")
    fact = svd_factors(16, 32, 32, 3, 3, dtype=torch.bfloat16).to("cuda")
    x = make_input(1, 32, 6, 6, "channels_last", torch.bfloat16)
    with pytest.raises(ValueError, match="HSV_CUDA_NHWC=wgmma"):
        hsvkernels.conv2d(x, fact, None, 1, 1)


def test_fused_mma_halo_auto_rule(impl, monkeypatch):
    # HSV_CUDA_MMA_HALO=auto: input blocks for stride 1 with at least as many 128-slot blocks as SMs,
    # the per-tap gather for stride 2 or fewer blocks
    if not is_hopper():
        pytest.skip("the mma.sync kernel needs compute capability 9.0 (thread-block clusters)")
    from hsvkernels._extension import _C
    monkeypatch.setenv("HSV_CUDA_NHWC", "mma")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    fact = svd_factors(14, 64, 64, 3, 3)
    big = -(-sms // 28)   # 56x56 outputs are 28 blocks of 8 x 14 per image
    for n, stride, want in ((big, 1, 1), (big, 2, 0), (1, 1, 0)):
        x = make_input(n, 64, 56, 56, "channels_last", torch.bfloat16)
        check_fused(impl, fact, x, None, stride, 1, 1)
        assert _C.cuda_mma_last_config()[4] == want, (n, stride)


def test_bad_nhwc_kernel_values_error(impl, monkeypatch):
    impl("fused")
    fact = svd_factors(16, 32, 32, 3, 3, dtype=torch.bfloat16).to("cuda")
    x = make_input(1, 32, 6, 6, "channels_last", torch.bfloat16)
    # HSV_CUDA_MMA_* are read by the mma kernel's launcher, which runs on Hopper only
    mma_only = (("HSV_CUDA_MMA_MI", "4"), ("HSV_CUDA_MMA_KSTEP", "16"), ("HSV_CUDA_MMA_HALO", "yes")) \
        if is_hopper() else ()
    for name, bad in (("HSV_CUDA_NHWC", "cutlass"),) + mma_only:
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match="%s='%s'" % (name, bad)):
            hsvkernels.conv2d(x, fact, None, 1, 1)
        monkeypatch.delenv(name)
    if has_wgmma():   # read by the wgmma kernel's launcher
        monkeypatch.setenv("HSV_CUDA_NHWC", "wgmma")
        monkeypatch.setenv("HSV_CUDA_WGMMA_WG", "3")
        with pytest.raises(ValueError, match="HSV_CUDA_WGMMA_WG='3'"):
            hsvkernels.conv2d(x, fact, None, 1, 1)


def test_fused_nhwc_not_taken_where_it_does_not_apply(impl):
    # Cin % 32 != 0, Cout % 8 != 0, NCHW input, a channels_last view whose output is NCHW, fp32:
    # the general fused kernel runs instead, and is right.
    cases = [((2, 48, 64, 16), "channels_last", torch.bfloat16), ((2, 64, 60, 16), "channels_last", torch.bfloat16),
             ((2, 64, 64, 16), "contiguous", torch.bfloat16),
             ((2, 64, 64, 16), "channels_last_noncontiguous", torch.float16),
             ((2, 64, 64, 16), "channels_last", torch.float32)]
    for (n, cin, cout, r), layout, dtype in cases:
        fact = svd_factors(r, cin, cout, 3, 3)
        before = nhwc_launches()
        check_fused(impl, fact, make_input(n, cin, 9, 9, layout, dtype), None, 1, 1, 1)
        assert nhwc_launches() == before, (cin, cout, layout, dtype)


def test_fused_packed_factors_follow_in_place_updates(impl):
    # The packed factors are cached per factor tensor and version: an in-place
    # update (an optimizer step) must be seen by the next call, on both paths.
    for layout, cin in (("channels_last", 64), ("contiguous", 40)):
        fact = svd_factors(24, cin, 48, 3, 3, dtype=torch.float64)
        fd = fact.to("cuda", torch.bfloat16)
        bias = torch.randn(48, device="cuda", dtype=torch.bfloat16)
        x = make_input(2, cin, 10, 10, layout, torch.bfloat16)
        impl("fused")
        y1 = hsvkernels.conv2d(x, fd, bias, 1, 1)
        with torch.no_grad():
            fd.factors[0].mul_(-2.0)
            fd.factors[1].add_(0.5)
            bias.mul_(3.0)
        y2 = hsvkernels.conv2d(x, fd, bias, 1, 1)
        impl("composite")
        y_comp = hsvkernels.conv2d(x, fd, bias, 1, 1)
        assert rel_err(y2, y_comp.double()) <= TOL[torch.bfloat16]
        assert rel_err(y1, y_comp.double()) > 0.5   # the update changed the answer, so y2 used it


def test_fused_first_call_inside_graph_capture(impl):
    # Factors first seen during a capture are packed by kernels that run only
    # when the graph replays: they must not be cached for eager calls.
    impl("fused")
    fact = svd_factors(24, 64, 48, 3, 3, dtype=torch.float64).to("cuda", torch.bfloat16)
    x = make_input(2, 64, 10, 10, "channels_last", torch.bfloat16)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = hsvkernels.conv2d(x, fact, None, 1, 1)
    y_eager = hsvkernels.conv2d(x, fact, None, 1, 1)   # before any replay
    g.replay()
    impl("composite")
    y_comp = hsvkernels.conv2d(x, fact, None, 1, 1)
    torch.cuda.synchronize()
    assert rel_err(y_eager, y_comp.double()) <= TOL[torch.bfloat16]
    assert rel_err(static_y, y_comp.double()) <= TOL[torch.bfloat16]


@st.composite
def nhwc_specs(draw):
    n, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw) = draw_conv_geometry(draw, kernel=5, padding=3, size=30, batch=4)
    cin, cout, r = 32 * draw(st.integers(1, 4)), 8 * draw(st.integers(1, 30)), draw(st.integers(1, 128))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    return n, cin, cout, r, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw), dtype, draw(st.booleans())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(nhwc_specs())
def test_fused_nhwc_vs_composite_random_shapes(impl, spec):
    # the default kernel choice (mma on Hopper, WMMA before) and the default tile and split model
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation, dtype, with_bias = spec
    fact = svd_factors(r, cin, cout, kh, kw)
    bias = torch.randn(cout, dtype=torch.float64) if with_bias else None
    before, before_mma = nhwc_launches(), mma_launches()
    x = make_input(n, cin, h, w, "channels_last", dtype)
    check_fused(impl, fact, x, bias, stride, padding, dilation)
    # a 1x1 image is NCHW-contiguous too: its output is NCHW, which the general fused kernel writes
    if n > 0 and not x.is_contiguous():
        assert nhwc_launches() - before == 1
        assert mma_launches() - before_mma == (1 if is_hopper() else 0)


def test_bad_split_k_value_errors(impl, monkeypatch):
    impl("fused")
    fact = svd_factors(4, 4, 6, 3, 3, dtype=torch.float16).to("cuda")
    x = torch.randn(1, 4, 5, 5, device="cuda", dtype=torch.float16)
    for bad in ("0", "-2", "two", "3x"):
        monkeypatch.setenv("HSV_CUDA_SPLIT_K", bad)
        with pytest.raises(ValueError, match="HSV_CUDA_SPLIT_K='%s'" % bad):
            hsvkernels.conv2d(x, fact)


def test_fused_falls_back_where_unsupported(impl):
    # rank above the kernel's limit, float64, and fp32 with TF32 off: composite, still right
    cases = [(svd_factors(129, 16, 32, 3, 3), torch.bfloat16), (svd_factors(8, 16, 32, 3, 3), torch.float64)]
    for fact, dtype in cases:
        x = make_input(2, 16, 9, 9, "contiguous", dtype)
        tol = 1e-11 if dtype == torch.float64 else TOL[dtype]
        impl("fused")
        before = launches()
        y = hsvkernels.conv2d(x, fact.to("cuda", dtype), None, 1, 1)
        assert launches() == before
        truth = F.conv2d(x.double().cpu(), fact.to_dense(), None, 1, 1)
        assert rel_err(y, truth) <= tol
    torch.backends.cudnn.allow_tf32 = False
    fact = svd_factors(8, 16, 32, 3, 3)
    x = make_input(2, 16, 9, 9, "contiguous", torch.float32)
    check_fused(impl, fact, x, None, 1, 1, 1, expect_fused=False)


def hsv_factors(P, T1, T2, S1, S2, kh, kw, dtype=torch.float64):
    b = torch.randn(P, T2, S2, kh, kw, dtype=dtype) / (S2 * kh * kw) ** 0.5
    a = torch.randn(T1, S1, P, dtype=dtype) / (S1 * P) ** 0.5
    return hsvkernels.Factorization("hsv", [b, a], (T1 * T2, S1 * S2, kh, kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", [
    # (P, T1, T2, S2, N, H, W, kh, kw, stride, padding, dilation); S1 = 1
    (14, 64, 1, 64, 2, 9, 11, 3, 3, 1, 1, 1),     # what decompose(ratio=4) gives a 64->64 3x3 layer
    (15, 64, 2, 128, 1, 8, 8, 3, 3, 1, 1, 1),     # T2 = 2 (128->128), Cout 128
    (5, 7, 3, 9, 3, 10, 7, 3, 2, 2, (1, 0), 1),   # T2 = 3, odd everything
    (32, 20, 4, 24, 2, 6, 6, 1, 1, 1, 0, 1),      # T2 = 4 (the limit), rank 128, 1x1
], ids=["t2_1", "t2_2", "t2_3", "t2_4"])
def test_fused_hsv_level1(spec, dtype, impl):
    P, T1, T2, S2, n, h, w, kh, kw, stride, padding, dilation = spec
    fact = hsv_factors(P, T1, T2, 1, S2, kh, kw)
    bias = torch.randn(T1 * T2, dtype=torch.float64)
    for layout in ("contiguous", "channels_last", "noncontiguous"):
        x = make_input(n, S2, h, w, layout, dtype)
        check_fused(impl, fact, x, bias, stride, padding, dilation)


@pytest.mark.parametrize("spec", [
    (4, 6, 2, 3, 5),     # S1 = 3 > 1
    (4, 6, 5, 1, 5),     # T2 = 5 > 4
    (40, 6, 4, 1, 5),    # P*T2 = 160 > 128
], ids=["s1", "t2", "rank"])
def test_fused_hsv_falls_back(spec, impl):
    P, T1, T2, S1, S2 = spec
    fact = hsv_factors(P, T1, T2, S1, S2, 3, 3)
    x = make_input(2, S1 * S2, 9, 8, "channels_last", torch.bfloat16)
    check_fused(impl, fact, x, None, 1, 1, 1, expect_fused=False)


def tucker2_factors(rs, rt, cin, cout, kh, kw, dtype=torch.float64):
    us = torch.randn(rs, cin, dtype=dtype) / cin ** 0.5
    core = torch.randn(rt, rs, kh, kw, dtype=dtype) / (rs * kh * kw) ** 0.5
    ut = torch.randn(cout, rt, dtype=dtype) / rt ** 0.5
    return hsvkernels.Factorization("tucker2", [us, core, ut], (cout, cin, kh, kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", [
    # (N, Cin, Cout, R_S, R_T, H, W, kh, kw, stride, padding, dilation)
    (2, 64, 64, 24, 24, 14, 14, 3, 3, 1, 1, 1),          # what decompose(ratio=4) gives a 64->64 layer
    (1, 40, 70, 35, 20, 19, 17, 3, 3, 2, 1, 1),          # stride 2, ranks and Cout off the tile sizes
    (3, 6, 10, 4, 3, 6, 5, 2, 3, (2, 1), (0, 1), (1, 2)),  # even kernel, mixed stride/dilation
    (1, 96, 128, 128, 128, 9, 10, 3, 3, 1, 1, 1),        # both ranks at the limit
    (2, 16, 8, 8, 16, 9, 9, 1, 1, 1, 0, 1),              # 1x1 core
    (0, 8, 8, 4, 4, 9, 9, 3, 3, 1, 1, 1),                # batch 0
], ids=["resnet", "stride2", "mixed", "rank128", "1x1", "batch0"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_fused_tucker2(spec, dtype, with_bias, impl):
    n, cin, cout, rs, rt, h, w, kh, kw, stride, padding, dilation = spec
    fact = tucker2_factors(rs, rt, cin, cout, kh, kw)
    bias = torch.randn(cout, dtype=torch.float64) if with_bias else None
    for layout in LAYOUTS:
        x = make_input(n, cin, h, w, layout, dtype)
        check_fused(impl, fact, x, bias, stride, padding, dilation)


def test_fused_tucker2_falls_back(impl):
    fact = tucker2_factors(8, 130, 16, 24, 3, 3)   # R_T above the limit
    check_fused(impl, fact, make_input(2, 16, 9, 9, "channels_last", torch.bfloat16), None, 1, 1, 1,
                expect_fused=False)
    torch.backends.cudnn.allow_tf32 = False
    fact = tucker2_factors(8, 8, 16, 24, 3, 3)
    check_fused(impl, fact, make_input(2, 16, 9, 9, "contiguous", torch.float32), None, 1, 1, 1,
                expect_fused=False)


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("svd", "hsv", "tucker2")])
def test_other_kinds_fall_back_to_composite(kind, impl):
    spec = SHAPES[0]
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
    if not CASES[kind].supports((cout, cin, kh, kw)):
        pytest.skip("shape not representable")
    fact = CASES[kind].random((cout, cin, kh, kw), dtype=torch.float64)
    x = make_input(n, cin, h, w, "channels_last", torch.bfloat16)
    check_fused(impl, fact, x, torch.randn(cout, dtype=torch.float64), stride, padding, dilation,
                expect_fused=False)


def fold_launches():
    from hsvkernels._extension import _C
    return _C.cuda_fold_launch_count()


def folded_case(kind, cin, cout, kh, kw, rank):
    """Factors of `kind` whose folded two-stage form has rank `rank` (csrc/ops/fold_two_stage.h)."""
    from hsv_case import random_factors as hsv_random
    if kind == "tucker2":
        return tucker2_factors(max(1, cin // 2), rank, cin, cout, kh, kw)
    if kind == "cp":
        return CASES["cp"].random((cout, cin, kh, kw), rank=rank)
    if kind in ("ht2", "tt_tucker"):
        return CASES[kind].random((cout, cin, kh, kw), r3=rank)
    # hsv with both level-2 splits, S1 = 1, T2 = 2: P*T2 = rank
    return hsv_random((cout, cin, kh, kw), layout="q1q2", rank=rank // 2, split=(cout // 2, 1, 2, cin))


FOLD_KINDS = ["tucker2", "ht2", "tt_tucker", "cp", "hsv"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", [
    # (N, Cin, Cout, rank, H, W, kh, kw, stride, padding, dilation)
    (2, 64, 64, 48, 14, 14, 3, 3, 1, 1, 1),              # channels_last fast path (Cin % 32, Cout % 8)
    (1, 96, 128, 128, 9, 10, 3, 3, 2, 1, 1),             # rank at the limit, stride 2
    (3, 20, 30, 18, 11, 9, 3, 2, (2, 1), (1, 0), (1, 2)),  # general kernel: odd channels, mixed geometry
    (0, 32, 32, 16, 9, 9, 3, 3, 1, 1, 1),                # batch 0
], ids=["nhwc", "rank128", "mixed", "batch0"])
@pytest.mark.parametrize("kind", FOLD_KINDS)
def test_fused_folded_kinds(kind, spec, dtype, impl, monkeypatch):
    n, cin, cout, rank, h, w, kh, kw, stride, padding, dilation = spec
    monkeypatch.setenv("HSV_CUDA_FOLD", "on")
    fact = folded_case(kind, cin, cout, kh, kw, rank)
    bias = torch.randn(cout, dtype=torch.float64)
    for layout in ("channels_last", "contiguous"):
        before = fold_launches()
        check_fused(impl, fact, make_input(n, cin, h, w, layout, dtype), bias, stride, padding, dilation)
        assert fold_launches() - before == (1 if n > 0 else 0), "the folded factors did not run"


@pytest.mark.parametrize("kind", FOLD_KINDS)
def test_folding_is_off_by_default_and_above_the_rank_limit(kind, impl, monkeypatch):
    monkeypatch.delenv("HSV_CUDA_FOLD", raising=False)
    before = fold_launches()
    # off: tucker2 keeps its own fused kernel, the others the composite chain
    x = make_input(2, 64, 9, 9, "channels_last", torch.bfloat16)
    check_fused(impl, folded_case(kind, 64, 64, 3, 3, 32), x, None, 1, 1, 1, expect_fused=kind == "tucker2")
    # on, but a folded rank of 136 is above the two-stage kernel's 128 (and R_T above tucker2's kernel)
    monkeypatch.setenv("HSV_CUDA_FOLD", "on")
    check_fused(impl, folded_case(kind, 64, 160, 3, 3, 136), x, None, 1, 1, 1, expect_fused=False)
    assert fold_launches() == before


def test_folded_factors_follow_in_place_updates_and_graphs(impl, monkeypatch):
    # The folded products are cached against every factor they read; in a graph they are recomputed per replay.
    monkeypatch.setenv("HSV_CUDA_FOLD", "on")
    fact = folded_case("ht2", 64, 64, 3, 3, 32).to("cuda", torch.bfloat16)
    x = make_input(2, 64, 10, 10, "channels_last", torch.bfloat16)

    def composite():
        impl("composite")
        y = hsvkernels.conv2d(x, fact, None, 1, 1)
        impl("fused")
        return y
    impl("fused")
    y1 = hsvkernels.conv2d(x, fact, None, 1, 1)
    with torch.no_grad():
        fact.factors[1].mul_(-2.0)   # G1: read by the folded V only as a dependency
    y2 = hsvkernels.conv2d(x, fact, None, 1, 1)
    y_comp = composite()
    assert rel_err(y2, y_comp.double()) <= TOL[torch.bfloat16]
    assert rel_err(y1, y_comp.double()) > 0.5
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = hsvkernels.conv2d(x, fact, None, 1, 1)
    with torch.no_grad():
        fact.factors[0].add_(0.25)
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(static_y, composite().double()) <= TOL[torch.bfloat16]


def test_bad_fold_value_errors(impl, monkeypatch):
    impl("fused")
    monkeypatch.setenv("HSV_CUDA_FOLD", "yes")
    fact = folded_case("tucker2", 32, 32, 3, 3, 16).to("cuda", torch.bfloat16)
    with pytest.raises(ValueError, match="HSV_CUDA_FOLD"):
        hsvkernels.conv2d(make_input(1, 32, 8, 8, "channels_last", torch.bfloat16), fact, None, 1, 1)


@st.composite
def conv_specs(draw):
    n, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw) = draw_conv_geometry(draw, kernel=5, padding=3, size=40, batch=4)
    cin, cout, r = draw(st.integers(1, 72)), draw(st.integers(1, 150)), draw(st.integers(1, 128))
    layout = draw(st.sampled_from(LAYOUTS))
    dtype = draw(st.sampled_from(DTYPES))
    with_bias = draw(st.booleans())
    return n, cin, cout, r, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw), layout, dtype, with_bias


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(conv_specs())
def test_fused_vs_composite_random_shapes(impl, spec):
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation, layout, dtype, with_bias = spec
    fact = svd_factors(r, cin, cout, kh, kw)
    bias = torch.randn(cout, dtype=torch.float64) if with_bias else None
    x = make_input(n, cin, h, w, layout, dtype)
    check_fused(impl, fact, x, bias, stride, padding, dilation)


@st.composite
def tucker2_specs(draw):
    # ranges whose halo and ranks always fit the kernel's shared memory (so it must run)
    n, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw) = draw_conv_geometry(draw, kernel=3, stride=2, size=30)
    cin, cout = draw(st.integers(1, 72)), draw(st.integers(1, 150))
    rs, rt = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    layout = draw(st.sampled_from(LAYOUTS))
    dtype = draw(st.sampled_from(DTYPES))
    return n, cin, cout, rs, rt, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw), layout, dtype


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(tucker2_specs())
def test_fused_tucker2_random_shapes(impl, spec):
    n, cin, cout, rs, rt, h, w, kh, kw, stride, padding, dilation, layout, dtype = spec
    fact = tucker2_factors(rs, rt, cin, cout, kh, kw)
    x = make_input(n, cin, h, w, layout, dtype)
    check_fused(impl, fact, x, torch.randn(cout, dtype=torch.float64), stride, padding, dilation)


def test_fused_forward_composite_backward(impl):
    # The forward runs fused; the backward op stays the composite chain.
    fact = svd_factors(12, 8, 20, 3, 3, dtype=torch.float32)
    x = torch.randn(2, 8, 11, 10, device="cuda", requires_grad=True)
    factors = [f.to("cuda").requires_grad_() for f in fact.factors]
    bias = torch.randn(20, device="cuda", requires_grad=True)
    grads = {}
    for which in ("composite", "fused"):
        impl(which)
        for t in [x, bias, *factors]:
            t.grad = None
        before = launches()
        y = torch.ops.hsv.conv2d(x, factors, bias, [2, 1], [1, 1], [1, 1], 1, "svd")
        assert launches() - before == (1 if which == "fused" else 0)
        y.square().sum().backward()
        grads[which] = [y.detach()] + [t.grad.clone() for t in [x, bias, *factors]]
    for a, b in zip(grads["fused"], grads["composite"]):
        assert rel_err(a, b) <= TOL[torch.float32]


def test_gradcheck_with_fused_selected(impl):
    impl("fused")   # float64 runs the chain; gradcheck and opcheck must still hold with fused selected
    fact = svd_factors(5, 4, 6, 3, 3)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    factors = [f.to("cuda").requires_grad_() for f in fact.factors]
    bias = torch.randn(6, dtype=torch.float64, device="cuda", requires_grad=True)

    def fn(x, v, u, b):
        return torch.ops.hsv.conv2d(x, [v, u], b, [2, 2], [1, 1], [1, 1], 1, "svd")

    assert torch.autograd.gradcheck(fn, (x, *factors, bias))
    args = (x.detach().half(), [f.detach().half() for f in factors], bias.detach().half(), [2, 2], [1, 1], [1, 1], 1,
            "svd")
    torch.library.opcheck(torch.ops.hsv.conv2d.default, args)


def test_fused_on_side_stream_and_in_cuda_graph(impl):
    impl("fused")
    fact = svd_factors(24, 32, 48, 3, 3, dtype=torch.bfloat16).to("cuda")
    x = make_input(4, 32, 14, 14, "channels_last", torch.bfloat16)
    expected = hsvkernels.conv2d(x, fact, None, 1, 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        before = launches()
        y_side = hsvkernels.conv2d(x, fact, None, 1, 1)
        assert launches() - before == 1
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y_side, expected)   # split-K sums in fp32 atomics: order may differ
    # capture on a side stream (as torch.cuda.graph does), then replay on new data
    g = torch.cuda.CUDAGraph()
    static_x = x.clone()
    with torch.cuda.graph(g):
        static_y = hsvkernels.conv2d(static_x, fact, None, 1, 1)
    x2 = make_input(4, 32, 14, 14, "channels_last", torch.bfloat16)
    static_x.copy_(x2)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, hsvkernels.conv2d(x2, fact, None, 1, 1))


@pytest.mark.parametrize("cin", [16, 64], ids=["general", "nhwc"])
def test_fused_under_compile_reduce_overhead(impl, cin):
    impl("fused")
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(cin, 32, 3, padding=1).cuda()
    layer = hsvkernels.FactorizedConv2d.from_conv(conv, method="svd", ratio=4).to(torch.bfloat16)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(4, cin, 14, 14, device="cuda", dtype=torch.bfloat16)
    if cin % 32 == 0:
        x = x.contiguous(memory_format=torch.channels_last)
    before = launches()
    for _ in range(3):
        y = compiled(x)
    assert launches() > before
    assert rel_err(y, layer(x).double()) <= TOL[torch.bfloat16]


def test_bad_impl_value_errors(impl):
    impl("fastest")
    fact = svd_factors(4, 4, 6, 3, 3, dtype=torch.float32).to("cuda")
    with pytest.raises(ValueError, match="HSV_CUDA_IMPL='fastest'"):
        hsvkernels.conv2d(torch.randn(1, 4, 5, 5, device="cuda"), fact)


def test_fused_argument_errors_match_composite(impl):
    fact = svd_factors(4, 4, 6, 3, 3, dtype=torch.float16).to("cuda")
    half = dict(device="cuda", dtype=torch.float16)
    bad = [
        (torch.randn(1, 5, 5, 5, **half), None),             # channel mismatch
        (torch.randn(1, 4, 5, 5, **half), torch.randn(7, **half)),   # bias size
        (torch.randn(1, 4, 2, 2, **half), None),             # too small without padding
    ]
    for x, bias in bad:
        msgs = []
        for which in ("composite", "fused"):
            impl(which)
            with pytest.raises(ValueError) as exc:
                torch.ops.hsv.conv2d(x, list(fact.factors), bias, [1, 1], [0, 0], [1, 1], 1, "svd")
            msgs.append(str(exc.value).split("\n")[0])
        assert msgs[0] == msgs[1]


# HSV_CUDA_PACK=kernel: the two-stage operands packed by one kernel of our own
# (pack_two_stage.cu) instead of ATen ops. The packed buffers must be the same,
# so the outputs must be bitwise equal; fresh factor tensors per path keep the
# packed-factor cache from serving one path's buffers to the other.
PACK_CASES = [
    # (kind, factor maker, N, Cin, H, W, stride, padding, layout, dtype)
    ("svd", lambda: svd_factors(24, 64, 72, 3, 3), 2, 64, 9, 7, 1, 1, "channels_last", torch.bfloat16),   # mma/NHWC
    ("svd", lambda: svd_factors(5, 8, 16, 3, 2), 2, 8, 9, 11, 2, 1, "contiguous", torch.float32),        # general
    ("svd", lambda: svd_factors(100, 32, 16, 1, 1), 1, 32, 6, 5, 1, 0, "channels_last", torch.float16),
    ("hsv", lambda: hsv_factors(15, 64, 2, 1, 128, 3, 3), 1, 128, 8, 8, 1, 1, "channels_last", torch.bfloat16),
    ("hsv", lambda: hsv_factors(5, 7, 3, 1, 9, 3, 2), 3, 9, 10, 7, 2, (1, 0), "contiguous", torch.float16),
]


def _fresh(fact, dtype, strided):
    """fact on the GPU in dtype, as new tensors; `strided`: V (or B) as a non-contiguous view."""
    fd = fact.to("cuda", dtype)
    factors = [f.clone() for f in fd.factors]
    if strided:   # same values, every stride doubled
        v = factors[0]
        spaced = torch.empty(v.shape + (2,), device=v.device, dtype=v.dtype)[..., 0]
        spaced.copy_(v)
        factors[0] = spaced
    return type(fd)(fd.kind, factors, fd.shape)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", PACK_CASES, ids=[c[0] + str(i) for i, c in enumerate(PACK_CASES)])
def test_pack_kernel_matches_aten_packing(case, with_bias, strided, impl, monkeypatch):
    kind, make, n, cin, h, w, stride, padding, layout, dtype = case
    fact = make()
    bias = torch.randn(fact.shape[0], device="cuda", dtype=dtype) if with_bias else None
    x = make_input(n, cin, h, w, layout, dtype)
    impl("fused")
    monkeypatch.setenv("HSV_CUDA_SPLIT_K", "1")   # no atomics: the two runs must add in the same order
    outs = []
    for pack in ("aten", "kernel"):
        monkeypatch.setenv("HSV_CUDA_PACK", pack)
        before = launches()
        outs.append(hsvkernels.conv2d(x, _fresh(fact, dtype, strided), None if bias is None else bias.clone(),
                                      stride, padding))
        assert launches() - before == 1
    torch.cuda.synchronize()
    assert torch.equal(outs[0], outs[1])
    check_fused(impl, fact, x, None if bias is None else bias.double().cpu(), stride, padding, 1)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_pack_kernel_in_graph_sees_in_place_updates(layout, impl, monkeypatch):
    # Under capture the packing runs on every replay: updating the factors and
    # the bias in place after capture must change what the next replay computes.
    impl("fused")
    monkeypatch.setenv("HSV_CUDA_PACK", "kernel")
    fact = hsv_factors(15, 64, 2, 1, 128, 3, 3).to("cuda", torch.bfloat16)
    bias = torch.randn(128, device="cuda", dtype=torch.bfloat16)
    x = make_input(2, 128, 8, 8, layout, torch.bfloat16)
    hsvkernels.conv2d(x, fact, bias, 1, 1)   # warm-up (and a cached packing, which the graph must not use)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = hsvkernels.conv2d(x, fact, bias, 1, 1)
    with torch.no_grad():
        fact.factors[0].mul_(-1.5)
        fact.factors[1].add_(0.25)
        bias.mul_(2.0)
    g.replay()
    impl("composite")
    y_comp = hsvkernels.conv2d(x, fact, bias, 1, 1)
    torch.cuda.synchronize()
    assert rel_err(static_y, y_comp.double()) <= TOL[torch.bfloat16]


def test_bad_pack_value_errors(impl, monkeypatch):
    impl("fused")
    monkeypatch.setenv("HSV_CUDA_PACK", "cutlass")
    fact = svd_factors(4, 8, 8, 3, 3, dtype=torch.float16).to("cuda")
    with pytest.raises(ValueError, match="HSV_CUDA_PACK='cutlass'"):
        hsvkernels.conv2d(torch.randn(1, 8, 5, 5, device="cuda", dtype=torch.float16), fact)


# HSV_CUDA_IMPL=auto (the default): with cudnn.benchmark on, the faster of fused
# and composite timed on the first call of each configuration; without it, fused
# only on the mma kernel's spatial convs with <= 128 input channels.
@pytest.fixture
def auto_choices():
    """The CUDA entries of the auto-choice table, cleared before and after the test."""
    from hsvkernels._extension import _C
    _C.clear_auto_choices()
    saved = torch.backends.cudnn.benchmark
    yield lambda: {k: v for k, v in _C.auto_choices().items() if k.startswith("cuda")}
    torch.backends.cudnn.benchmark = saved
    _C.clear_auto_choices()


AUTO_CASES = [   # (factorization maker, N, Cin, H, W, layout, dtype): one per fused kernel
    (lambda: hsv_factors(15, 64, 2, 1, 128, 3, 3), 2, 128, 10, 9, "channels_last", torch.bfloat16),   # mma
    (lambda: svd_factors(12, 24, 40, 3, 3), 3, 24, 11, 7, "contiguous", torch.float32),
    (lambda: tucker2_factors(6, 5, 12, 10, 3, 3), 2, 12, 9, 9, "contiguous", torch.float16),
]


def _auto_case(case):
    make, n, cin, h, w, layout, dtype = case
    fact = make()
    x = make_input(n, cin, h, w, layout, dtype)
    truth = F.conv2d(x.double().cpu(), fact.to_dense().double(), None, 1, 1)
    return fact.to("cuda", dtype), x, truth


def test_auto_is_the_default_and_follows_its_rule_without_benchmark(auto_choices, monkeypatch):
    monkeypatch.delenv("HSV_CUDA_IMPL", raising=False)
    assert INFO["cuda_kernels"] == "auto"
    torch.backends.cudnn.benchmark = False
    for i, case in enumerate(AUTO_CASES):
        fd, x, truth = _auto_case(case)
        before = launches()
        y = hsvkernels.conv2d(x, fd, None, 1, 1)
        torch.cuda.synchronize()
        fused = i == 0 and is_hopper()   # only the mma kernel's case; fp32, NCHW and tucker2 run composite
        assert launches() - before == int(fused), "auto without cudnn.benchmark ran the wrong path"
        assert rel_err(y, truth) <= TOL[x.dtype]
    assert auto_choices() == {}, "nothing is timed without cudnn.benchmark"


def test_auto_rule_keeps_wide_and_pointwise_layers_composite(impl, auto_choices):
    # >= 256 input channels or a 1x1 conv: the mma kernel measured slower than composite there
    impl("auto")
    torch.backends.cudnn.benchmark = False
    for fact, cin in ((svd_factors(24, 256, 64, 3, 3), 256), (svd_factors(24, 128, 256, 1, 1), 128)):
        x = make_input(2, cin, 8, 8, "channels_last", torch.bfloat16)
        before = launches()
        hsvkernels.conv2d(x, fact.to("cuda", torch.bfloat16), None, 1, 1)
        assert launches() == before


def test_auto_times_each_configuration_once_under_benchmark(impl, auto_choices):
    impl("auto")
    torch.backends.cudnn.benchmark = True
    cases = [_auto_case(c) for c in AUTO_CASES]
    for fd, x, truth in cases:
        y = hsvkernels.conv2d(x, fd, None, 1, 1)
        assert rel_err(y, truth) <= TOL[x.dtype]
    choices = auto_choices()
    assert len(choices) == len(cases) and set(choices.values()) <= {"fused", "composite"}
    assert {k.split()[1] for k in choices} == {"hsv", "svd", "tucker2"}
    # Decided: the same configurations again time nothing and run the kept path
    # (a fused choice launches the fused kernel once, a composite one never).
    path = {k.split()[1]: v for k, v in choices.items()}
    for fd, x, truth in cases:
        before = launches()
        y = hsvkernels.conv2d(x, fd, None, 1, 1)
        torch.cuda.synchronize()
        assert launches() - before == (1 if path[fd.kind] == "fused" else 0)
        assert rel_err(y, truth) <= TOL[x.dtype]
    assert auto_choices() == choices


def test_auto_under_graph_capture_does_not_time(impl, auto_choices):
    # Timing synchronises the device, which a capture forbids: a configuration
    # first seen while capturing runs fused and stays undecided.
    impl("auto")
    fd, x, truth = _auto_case(AUTO_CASES[0])
    torch.backends.cudnn.benchmark = False
    hsvkernels.conv2d(x, fd, None, 1, 1)   # warm-up outside the capture; decides nothing
    torch.cuda.synchronize()
    torch.backends.cudnn.benchmark = True
    g = torch.cuda.CUDAGraph()
    before = launches()
    with torch.cuda.graph(g):
        y = hsvkernels.conv2d(x, fd, None, 1, 1)
    assert launches() - before == int(is_hopper())   # the rule's choice, as without cudnn.benchmark
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(y, truth) <= TOL[x.dtype]
    assert auto_choices() == {}


def test_auto_choice_is_reused_inside_a_graph(impl, auto_choices):
    impl("auto")
    torch.backends.cudnn.benchmark = True
    fd, x, truth = _auto_case(AUTO_CASES[0])
    hsvkernels.conv2d(x, fd, None, 1, 1)   # decided here, eagerly
    (path,) = auto_choices().values()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    before = launches()
    with torch.cuda.graph(g):
        y = hsvkernels.conv2d(x, fd, None, 1, 1)
    assert launches() - before == (1 if path == "fused" else 0)
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(y, truth) <= TOL[x.dtype]
