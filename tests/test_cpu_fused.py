"""The fused CPU forward of kind "svd" (HSV_CPU_IMPL=fused; the hsv kernel with S1 = T2 = 1) under every ISA path.

Ground truth is F.conv2d in float64 on the dense weight rebuilt from the same
factors; hypothesis-drawn shapes compare fused against the composite chain.
"""
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from bench.timing import env_set
from factories import CASES, draw_conv_geometry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_op import SHAPES

import hsvkernels
from hsvkernels import _extension

INFO = hsvkernels.build_info()
pytestmark = pytest.mark.skipif(not INFO.get("extension"), reason="needs the native extension")

ISA_ORDER = ["avx512", "avx2", "scalar"]
_RANK = {"avx512": 2, "avx2": 1, "scalar": 0}
ISAS = [i for i in ISA_ORDER if INFO.get("extension") and _RANK[i] <= _RANK[INFO["cpu_isa"]]]
TOL32 = 2e-5


def env_vars(**settings):
    """The environment variables set for the block (None: unset), each as it was afterwards."""
    return env_set(settings)


@contextmanager
def cpu_env(impl=None, isa=None, threads=None):
    saved_threads = torch.get_num_threads()
    try:
        with env_vars(HSV_CPU_IMPL=impl, HSV_CPU_ISA=isa):
            if threads is not None:
                torch.set_num_threads(threads)
            yield
    finally:
        torch.set_num_threads(saved_threads)


def _rel_err(y, ref):
    if ref.numel() == 0:
        return 0.0
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()


def _make_input(n, cin, h, w, layout):
    if layout == "channels_last":
        return torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        return torch.randn(n, cin, h, 2 * w)[..., ::2]
    if layout == "channels_last_noncontiguous":
        return torch.randn(n, h, 2 * w, cin).permute(0, 3, 1, 2)[..., ::2]
    return torch.randn(n, cin, h, w)


def _expected_format(x):
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def assert_fused_matches_composite(x, args, isa, threads):
    """torch.ops.hsv.conv2d(x, *args) on the fused path (isa, threads) equals the composite chain,
    in shape, memory format and value.

    The error may be TOL32 of the output's largest value, or 1e-6 (about 16 fp32 roundings) of the chain's
    magnitude before cancellation (the same chain on |x|, |factors|, |bias|), whichever is larger: an output of
    one small element that is the difference of large terms (hypothesis drew one: 1 x 1 x 1 x 1, value 0.0076,
    off by 1e-6) fails the first on rounding alone. On random data the magnitude is 10-80x the output, so the
    second bound is at most a few times the first; a wrong index or a missing term errs far above both."""
    with cpu_env("composite"):
        yc = torch.ops.hsv.conv2d(x, *args)
        factors, bias = args[0], args[1]
        magnitude = torch.ops.hsv.conv2d(x.abs(), [f.abs() for f in factors], None if bias is None else bias.abs(),
                                         *args[2:])
    with cpu_env("fused", isa, threads):
        yf = torch.ops.hsv.conv2d(x, *args)
    assert yf.shape == yc.shape and yf.is_contiguous(memory_format=_expected_format(x))
    if yc.numel():
        bound = max(TOL32 * yc.double().abs().max().item(), 1e-6 * magnitude.double().abs().max().item(), 1e-30)
        assert (yf.double() - yc.double()).abs().max().item() <= bound


def assert_impls_agree_in_autograd(x, factors, kind, stride, padding, dilation):
    """Forward and backward of torch.ops.hsv.conv2d under HSV_CPU_IMPL composite, fused and auto agree
    (the backward op is the composite chain under every setting)."""
    results = []
    for impl in ("composite", "fused", "auto"):
        xi = x.detach().clone().requires_grad_()
        fi = [f.detach().clone().requires_grad_() for f in factors]
        with cpu_env(impl):
            y = torch.ops.hsv.conv2d(xi, fi, None, stride, padding, dilation, 1, kind)
            y.square().sum().backward()
        results.append((y.detach(), xi.grad, [f.grad for f in fi]))
    for y, gx, gf in results[1:]:
        assert _rel_err(y, results[0][0]) <= TOL32
        assert _rel_err(gx, results[0][1]) <= 1e-4
        for a, b in zip(gf, results[0][2]):
            assert _rel_err(a, b) <= 1e-4


def assert_errors_match_composite(factors, kind, cin):
    """For a 3x3 layer with cin input channels and a Cout other than 7: a channel mismatch, a wrong bias
    size and an input too small without padding raise the same ValueError under composite and fused."""
    bad = [
        (torch.randn(1, cin + 1, 5, 5), None),          # channel mismatch
        (torch.randn(1, cin, 5, 5), torch.randn(7)),    # bias size
        (torch.randn(1, cin, 2, 2), None),              # too small without padding
    ]
    for x, bias in bad:
        msgs = []
        for impl in ("composite", "fused"):
            with cpu_env(impl), pytest.raises(ValueError) as exc:
                torch.ops.hsv.conv2d(x, list(factors), bias, [1, 1], [0, 0], [1, 1], 1, kind)
            msgs.append(str(exc.value).split("\n")[0])
        assert msgs[0] == msgs[1]


def packed_after(fn):
    """fn()'s result and the packed-factor cache's size after it, counted from empty. Only the fused
    kernels pack factors, so a non-zero size says one ran."""
    _extension._C.clear_packed_cache()
    out = fn()
    return out, _extension._C.packed_cache_size()


def pointwise_runs():
    """How often the fused path ran a 1x1 NCHW layer as pixels-as-vectors GEMMs (which packs its two factors)."""
    return _extension._C.cpu_pointwise_nchw_runs()


def check_kind_against_dense(kind, spec, layout, isa, threads, with_bias, packed_factors):
    """A random `kind` factorization through hsvkernels.conv2d on the fused path against F.conv2d in float64
    on its dense weight; with a non-empty batch, the fused kernel must have packed `packed_factors` factors."""
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
    fact = CASES[kind].random((cout, cin, kh, kw), dtype=torch.float64)
    x = _make_input(n, cin, h, w, layout)
    bias = torch.randn(cout, dtype=torch.float64) if with_bias else None
    truth = F.conv2d(x.double(), fact.to_dense(), bias, stride, padding, dilation)
    with cpu_env("fused", isa, threads):
        before = pointwise_runs()
        y, packed = packed_after(lambda: hsvkernels.conv2d(x, fact.to(torch.float32),
                                                          None if bias is None else bias.float(), stride, padding,
                                                          dilation))
        pointwise = pointwise_runs() > before
    assert y.dtype == torch.float32 and y.shape == truth.shape
    assert y.is_contiguous(memory_format=_expected_format(x))
    if n > 0:  # the last stages ran fused: packed by the general kernel, or as 1x1 NCHW GEMMs (V and U packed)
        assert packed == (2 if pointwise else packed_factors), "the fused kernel did not run (it alone packs factors)"
    assert _rel_err(y, truth) <= TOL32


def assert_composite_does_not_pack(kind):
    """The other side of packed_after's "fused ran" signal: the composite chain packs nothing."""
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = SHAPES[0]
    fact = CASES[kind].random((cout, cin, kh, kw), dtype=torch.float32)
    with cpu_env("composite"):
        _, packed = packed_after(lambda: hsvkernels.conv2d(torch.randn(n, cin, h, w), fact, None, stride, padding,
                                                           dilation))
    assert packed == 0


def _check_against_dense(spec, layout, with_bias=True, fact=None):
    """The op on float32 against F.conv2d in float64 on fact's dense weight (a random svd one by default)."""
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
    if fact is None:
        fact = CASES["svd"].random((cout, cin, kh, kw), dtype=torch.float64)
    x = _make_input(n, cin, h, w, layout)
    bias = torch.randn(cout, dtype=torch.float64) if with_bias else None
    truth = F.conv2d(x.double(), fact.to_dense(), bias, stride, padding, dilation)
    y = hsvkernels.conv2d(x, fact.to(torch.float32), None if bias is None else bias.float(), stride, padding, dilation)
    assert y.dtype == torch.float32 and y.shape == truth.shape
    assert y.is_contiguous(memory_format=_expected_format(x))
    assert _rel_err(y, truth) <= TOL32


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("spec", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
def test_fused_matches_dense(spec, isa, threads):
    with cpu_env("fused", isa, threads):
        _check_against_dense(spec, "contiguous")


# the foundation shapes the layout tests run (every layout x ISA x threads), and their ids
LAYOUT_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[7], SHAPES[8], SHAPES[10], SHAPES[11]]
LAYOUT_IDS = ["3x3", "stride2", "7x7s2", "1x1", "batch0", "mixed"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous", "channels_last_noncontiguous"])
@pytest.mark.parametrize("spec", LAYOUT_SHAPES, ids=LAYOUT_IDS)
def test_fused_layouts(spec, layout, isa, threads):
    with cpu_env("fused", isa, threads):
        _check_against_dense(spec, layout)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("spec", [
    (1, 40, 70, 13, 11, 3, 3, 1, 1, 1),    # r = 35, Cout = 70: narrow microkernels
    (2, 16, 128, 9, 10, 3, 3, 1, 1, 1),    # r = 64, Cout = 128: wide, whole panels
    (2, 12, 100, 9, 10, 3, 3, 2, 1, 1),    # r = 50, Cout = 100: wide, edge panels
], ids=["narrow", "wide", "wide-edges"])
def test_fused_panel_widths_without_bias(spec, isa):
    # Cout and r past several NR panels, a pixel count that is no multiple of
    # the tile, batch 1 and 2, with and without bias.
    for threads in (1, 2):
        with cpu_env("fused", isa, threads):
            _check_against_dense(spec, "contiguous", with_bias=False)
            _check_against_dense(spec, "channels_last")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("spec", [
    (4, 8, 20, 20, 19, 3, 3, 1, 1, 1),   # many 128-pixel tiles: whole tiles per thread
    (1, 24, 36, 7, 7, 3, 3, 1, 1, 1),    # 49 pixels: tiles shrink so every thread gets some
], ids=["tiles", "panels"])
def test_fused_parallel_modes(spec, layout, isa):
    for threads in (1, 2, 3):
        with cpu_env("fused", isa, threads):
            _check_against_dense(spec, layout)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous", "channels_last_noncontiguous"])
@pytest.mark.parametrize("spec", [
    (2, 3, 16, 23, 21, 7, 7, 2, 3, 1),           # an RGB stem: kernel rows cross both borders
    (1, 3, 8, 5, 4, 3, 7, 1, (1, 3), 1),         # W < kw: every kernel row is gathered
    (3, 8, 12, 9, 10, 3, 5, 1, 2, (2, 1)),       # 8 channels (the largest such input), dilated rows
    (2, 1, 5, 6, 7, 3, 3, (1, 2), 1, 1),          # one channel
    (2, 9, 6, 8, 8, 3, 3, 1, 1, 1),              # 9 channels: the per-tap walk, for contrast
    (2, 4, 6, 8, 9, 3, 3, 1, 1, (1, 2)),         # dilated columns: the per-tap walk
], ids=["stem", "narrow-image", "8ch", "1ch", "9ch", "dilated-w"])
def test_fused_few_input_channels(spec, layout, isa):
    # Inputs with <= 8 channels walk K by kernel row (hsv_fused.cpp, tile_conv_rows)
    # instead of by tap, reading NHWC rows in place or copying them in first.
    for threads in (1, 2):
        with cpu_env("fused", isa, threads):
            _check_against_dense(spec, layout)
            _check_against_dense(spec, layout, with_bias=False)


def im2col_panels_runs():
    """How often the fused path ran a conv with few input channels with pixels as the vector axis."""
    return _extension._C.cpu_im2col_panels_runs()


def im2col_panels(setting):
    return env_vars(HSV_CPU_IM2COL_PANELS=setting)


# n, cin, cout, r, h, w, kh, kw, stride, padding, dilation
IM2COL_PANEL_DIMS = [
    (2, 3, 64, 11, 37, 45, 7, 7, 2, 3, 1),             # a stem at 4x (r 11); 19 x 23 outputs: partial panels
    (1, 3, 13, 5, 20, 70, 3, 3, 1, 1, 1),              # 70-wide rows: several panels per row; Cout, r no multiple of MR
    (3, 1, 7, 2, 9, 5, 3, 3, (1, 2), (2, 0), 1),       # one channel, padding taller than the stride
    (2, 4, 20, 28, 12, 31, 3, 5, (2, 3), (1, 2), (2, 1)),  # 4 channels, dilated rows, three column phases
    (1, 8, 16, 9, 11, 50, 3, 3, 1, 1, 1),              # 8 channels (at stride 1 only)
    (1, 4, 6, 3, 6, 40, 1, 3, 1, (0, 1), (1, 2)),      # a 1 x kw conv (ht2's last stage), dilated columns
    (2, 2, 9, 6, 3, 4, 5, 5, 1, 2, 1),                 # image smaller than the kernel
    (0, 3, 8, 4, 9, 9, 3, 3, 1, 1, 1),                 # batch 0
]
IM2COL_PANEL_IDS = ["stem", "wide-rows", "1ch", "4ch-dilated", "8ch", "1xk", "small-image", "batch0"]


def _svd_dense(v, u):
    return (u @ v.flatten(1)).view(u.shape[0], *v.shape[1:])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous", "channels_last_noncontiguous"])
@pytest.mark.parametrize("dims", IM2COL_PANEL_DIMS, ids=IM2COL_PANEL_IDS)
def test_fused_im2col_panels(dims, layout, isa):
    # Convs with <= 8 input channels (<= 4 when strided) run with pixels as the vector axis (im2col_panels.cpp),
    # for kind svd and hsv in its SVD layout, in any input layout: against float64 truth and the general kernel.
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation = dims
    x = _make_input(n, cin, h, w, layout)
    v, u = torch.randn(r, cin, kh, kw, dtype=torch.float64), torch.randn(cout, r, dtype=torch.float64)
    bias = torch.randn(cout, dtype=torch.float64)
    truth = F.conv2d(x.double(), _svd_dense(v, u), bias, stride, padding, dilation)
    pair = lambda t: list(t) if isinstance(t, tuple) else [t, t]  # noqa: E731
    conv_args = (pair(stride), pair(padding), pair(dilation), 1)
    for kind, factors in (("svd", [v, u]), ("hsv", [v.unsqueeze(1), u.unsqueeze(1)])):
        factors = [f.float() for f in factors]
        for threads in (1, 3):
            for b in (bias, None):
                args = (factors, None if b is None else b.float(), *conv_args, kind)
                with cpu_env("fused", isa, threads):
                    before = im2col_panels_runs()
                    y = torch.ops.hsv.conv2d(x, *args)
                    ran = im2col_panels_runs() > before
                    with im2col_panels("off"):
                        y_general = torch.ops.hsv.conv2d(x, *args)
                    assert im2col_panels_runs() == before + ran
                assert ran == (n > 0)
                assert y.shape == truth.shape and y.is_contiguous(memory_format=_expected_format(x))
                expected = truth if b is not None else truth - bias.view(1, -1, 1, 1)
                assert _rel_err(y, expected) <= TOL32
                assert _rel_err(y, y_general) <= TOL32


def test_fused_im2col_panels_only_where_it_applies():
    # 9 input channels, 5 at stride 2, a 1x1 conv, hsv with T2 > 1, a stride over 16 (its phase copies would
    # take stride x the row: 10**9 asked for gigabytes) and the setting "off" take the other kernels; a bad
    # setting is refused by name.
    three = [torch.randn(4, 3, 3, 3), torch.randn(6, 4)]
    cases = [
        (torch.randn(2, 9, 10, 10), [torch.randn(4, 9, 3, 3), torch.randn(6, 4)], "svd", 1, [1, 1], False),
        (torch.randn(2, 5, 10, 10), [torch.randn(4, 5, 3, 3), torch.randn(6, 4)], "svd", 1, [2, 2], False),
        (torch.randn(2, 3, 10, 10), [torch.randn(4, 3, 1, 1), torch.randn(6, 4)], "svd", 0, [1, 1], False),
        (torch.randn(2, 3, 10, 10), [torch.randn(4, 2, 3, 3, 3), torch.randn(3, 1, 4)], "hsv", 1, [1, 1], False),
        (torch.randn(2, 3, 10, 40), three, "svd", 1, [1, 17], False),
        (torch.randn(2, 3, 10, 10), three, "svd", 1, [1, 10 ** 9], False),
        (torch.randn(2, 3, 10, 40), three, "svd", 1, [16, 16], True),
        (torch.randn(2, 3, 10, 10), three, "svd", 1, [1, 1], True),
    ]
    for x, factors, kind, pad, stride, applies in cases:
        with cpu_env("fused"):
            before = im2col_panels_runs()
            y = torch.ops.hsv.conv2d(x, factors, None, stride, [pad, pad], [1, 1], 1, kind)
            assert (im2col_panels_runs() > before) == applies
            with im2col_panels("off"):
                before = im2col_panels_runs()
                y_off = torch.ops.hsv.conv2d(x, factors, None, stride, [pad, pad], [1, 1], 1, kind)
                assert im2col_panels_runs() == before
        assert _rel_err(y, y_off) <= TOL32
    with cpu_env("fused"), im2col_panels("yes"), pytest.raises(ValueError, match="HSV_CPU_IM2COL_PANELS='yes'"):
        torch.ops.hsv.conv2d(cases[-1][0], cases[-1][1], None, [1, 1], [1, 1], [1, 1], 1, "svd")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["contiguous", "channel_slice", "batch_slice", "width_slice"])
@pytest.mark.parametrize("dims", [
    (3, 17, 29, 13, 7, 9, 1, 1),     # Cout and r no multiple of MR, 63 pixels: a partial panel per image
    (1, 40, 70, 24, 33, 35, 1, 1),   # 1155 pixels at batch 1: several tiles, split over the threads
    (2, 5, 12, 3, 1, 1, 1, 1),       # one pixel per image
    (0, 8, 8, 4, 5, 5, 1, 1),        # batch 0
    (2, 24, 20, 14, 15, 17, 2, 2),   # stride 2 on odd sizes: 8 x 9 outputs
    (3, 20, 26, 12, 13, 80, 1, 3),   # stride (1, 3): 13 x 27 outputs, tiles across images
    (2, 33, 10, 7, 56, 56, 2, 2),    # stride 2, 28 x 28 outputs: several gathered tiles per image
], ids=["edges", "tiles", "1px", "batch0", "stride2", "stride1x3", "stride2-large"])
def test_fused_pointwise_nchw(dims, layout, isa):
    # 1x1 layers on NCHW input run as two GEMMs with pixels as the vector axis
    # (pointwise_nchw.cpp), for kind svd and for hsv in its SVD layout: read in
    # place, or gathered first (strides, width slices, small images).
    n, cin, cout, r, h, w, sy, sx = dims
    x = torch.randn(n, cin, h, w)
    if layout == "channel_slice":
        x = torch.randn(n, 2 * cin, h, w)[:, ::2]
    elif layout == "batch_slice":
        x = torch.randn(n + 1, cin, h, w)[1:]
    elif layout == "width_slice":
        x = torch.randn(n, cin, h, 2 * w)[..., 1::2]
    v, u = torch.randn(r, cin, 1, 1, dtype=torch.float64), torch.randn(cout, r, dtype=torch.float64)
    bias = torch.randn(cout, dtype=torch.float64)
    truth = F.conv2d(x.double(), (u @ v.flatten(1)).view(cout, cin, 1, 1), bias, (sy, sx))
    for kind, factors in (("svd", [v, u]), ("hsv", [v.view(r, 1, cin, 1, 1), u.view(cout, 1, r)])):
        for threads in (1, 2):
            for b in (bias, None):
                with cpu_env("fused", isa, threads):
                    before = pointwise_runs()
                    y = torch.ops.hsv.conv2d(x, [f.float() for f in factors], None if b is None else b.float(),
                                             [sy, sx], [0, 0], [1, 1], 1, kind)
                    ran = pointwise_runs() > before
                assert ran == (n > 0 and x.stride(1) != 1)  # one-pixel planes: channels are unit-stride
                assert y.shape == truth.shape and y.is_contiguous()
                expected = truth if b is not None else truth - bias.view(1, -1, 1, 1)
                assert _rel_err(y, expected) <= TOL32


@pytest.mark.parametrize("isa", ISAS)
def test_fused_pointwise_nchw_edge_columns_stay_in_their_pixels(isa):
    # The strided kernel reads a plane's last panel NR wide where it lies, so
    # its extra columns come from the next plane: here a NaN channel between
    # every pair of real ones. Those columns must never reach the output. At the
    # end of the storage the panel is copied instead (no read past the tensor).
    n, cin, cout, r, h, w = 2, 9, 14, 13, 7, 9  # 63 pixels: a partial panel for NR 8, 16 and 32
    base = torch.full((n, 2 * cin, h, w), float("nan"))
    base[:, ::2] = torch.randn(n, cin, h, w)
    x = base[:, ::2]
    v, u = torch.randn(r, cin, 1, 1), torch.randn(cout, r)
    truth = F.conv2d(x.double(), (u.double() @ v.double().flatten(1)).view(cout, cin, 1, 1))
    for threads in (1, 2):
        with cpu_env("fused", isa, threads):
            before = pointwise_runs()
            y = torch.ops.hsv.conv2d(x, [v, u], None, [1, 1], [0, 0], [1, 1], 1, "svd")
            assert pointwise_runs() > before
        assert torch.isfinite(y).all()
        assert _rel_err(y, truth) <= TOL32


@pytest.mark.parametrize("isa", ISAS)
def test_fused_pointwise_nchw_repacks_v_after_in_place_update(isa):
    # V's and U's packed forms are cached against the factors (pack.h); an
    # in-place update bumps a factor's version counter, so the next call must
    # repack that factor.
    v, u = torch.randn(20, 48, 1, 1), torch.randn(24, 20)
    x = torch.randn(2, 48, 10, 11)
    outputs = []
    with cpu_env("fused", isa):
        for update in (None, lambda: v[3].mul_(-2.0), lambda: u[:, 5].mul_(3.0)):
            if update is not None:
                with torch.no_grad():
                    update()
            y = torch.ops.hsv.conv2d(x, [v, u], None, [1, 1], [0, 0], [1, 1], 1, "svd")
            truth = F.conv2d(x.double(), (u.double() @ v.double().flatten(1)).view(24, 48, 1, 1))
            assert _rel_err(y, truth) <= TOL32
            outputs.append(y)
    assert _rel_err(outputs[0], outputs[1]) > 1e-2 and _rel_err(outputs[1], outputs[2]) > 1e-2


def test_fused_pointwise_nchw_only_where_it_applies():
    # 1x1 and unpadded, on input whose channels are not unit-stride; any stride.
    v, u = torch.randn(6, 8, 1, 1), torch.randn(10, 6)
    cases = [(torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last), [1, 1], [0, 0], False),
             (torch.randn(2, 8, 9, 9), [1, 1], [1, 1], False),
             (torch.randn(2, 8, 9, 9), [2, 2], [0, 0], True),
             (torch.randn(2, 8, 9, 18)[..., ::2], [1, 1], [0, 0], True)]
    for x, stride, padding, applies in cases:
        with cpu_env("fused"):
            before = pointwise_runs()
            y = torch.ops.hsv.conv2d(x, [v, u], None, stride, padding, [1, 1], 1, "svd")
            assert (pointwise_runs() > before) == applies
        truth = F.conv2d(x.double(), (u.double() @ v.double().flatten(1)).view(10, 8, 1, 1), None, stride, padding)
        assert _rel_err(y, truth) <= TOL32


def test_fused_pointwise_nchw_size_rule_and_switch():
    # Auto: only while V fits in 3/4 of the L2 cache (each pixel panel streams all of V; one from L3 ran
    # slower than the general kernel). A 96 x 16384 V (6 MB) is past any L2; 24 x 64 is within any.
    # HSV_CPU_POINTWISE_NCHW=on takes the path regardless, off never does; both give the same function.
    cases = [((1, 16384, 2, 3), 96, 7), ((2, 64, 9, 9), 24, 40)]
    for (n, cin, h, w), r, cout in cases:
        x, v, u = torch.randn(n, cin, h, w), torch.randn(r, cin, 1, 1) / cin ** 0.5, torch.randn(cout, r)
        truth = F.conv2d(x.double(), (u.double() @ v.double().flatten(1)).view(cout, cin, 1, 1))
        small = r * cin <= 4096
        for setting, applies in ((None, small), ("auto", small), ("on", True), ("off", False)):
            with cpu_env("fused"), env_vars(HSV_CPU_POINTWISE_NCHW=setting):
                before = pointwise_runs()
                y = torch.ops.hsv.conv2d(x, [v, u], None, [1, 1], [0, 0], [1, 1], 1, "svd")
                assert (pointwise_runs() > before) == applies, (cin, setting)
            assert _rel_err(y, truth) <= TOL32
    with cpu_env("fused"), env_vars(HSV_CPU_POINTWISE_NCHW="yes"):
        with pytest.raises(ValueError, match="HSV_CPU_POINTWISE_NCHW='yes' is not one of 'auto', 'on', 'off'"):
            torch.ops.hsv.conv2d(x, [v, u], None, [1, 1], [0, 0], [1, 1], 1, "svd")


@pytest.mark.parametrize("isa", ISAS)
def test_to_channels_last_copy(isa):
    """The kernels' NCHW -> NHWC copy (register transposes, edge blocks masked or
    scalar) equals ATen's, for channel and pixel counts around the 16 / 8 blocks,
    batch- and channel-sliced inputs, and 1 and 2 threads."""
    cases = []
    for c in (1, 3, 7, 8, 9, 15, 16, 17, 33):
        for h, w in ((1, 1), (3, 5), (4, 4), (5, 7), (2, 17)):
            x = torch.randn(3, c + 2, h, w)
            cases += [x[:, :c], x[1:, 1:c + 1], x[:2, :c].clone()]
    cases.append(torch.randn(2, 64, 64, 64))  # enough floats for the thread split
    cases.append(torch.randn(0, 5, 3, 3))
    for threads in (1, 2):
        with cpu_env(isa=isa, threads=threads):
            for x in cases:
                y = _extension._C.cpu_to_channels_last(x)
                assert y.is_contiguous(memory_format=torch.channels_last), (isa, x.shape)
                assert torch.equal(y, x), (isa, threads, x.shape, x.stride())


def test_to_channels_last_copy_rejects_bad_input():
    with pytest.raises(ValueError, match="expected a 4-D"):
        _extension._C.cpu_to_channels_last(torch.randn(3, 4, 5))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="expected a CPU tensor"):
            _extension._C.cpu_to_channels_last(torch.randn(1, 2, 3, 3, device="cuda"))


def test_fused_matches_composite_shape_and_format():
    spec = SHAPES[0]
    n, cin, cout, h, w, kh, kw, stride, padding, dilation = spec
    fact = CASES["svd"].random((cout, cin, kh, kw), dtype=torch.float32)
    x = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(cout)
    with cpu_env("composite"):
        yc = hsvkernels.conv2d(x, fact, bias, stride, padding, dilation)
    with cpu_env("fused"):
        yf = hsvkernels.conv2d(x, fact, bias, stride, padding, dilation)
    assert yc.shape == yf.shape and yf.is_contiguous(memory_format=torch.channels_last)
    assert _rel_err(yf, yc) <= TOL32


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fused_falls_back_for_other_dtypes(dtype):
    fact = CASES["svd"].random((16, 8, 3, 3), dtype=torch.float64)
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    truth = F.conv2d(x, fact.to_dense(), None, 1, 1)
    with cpu_env("fused"):
        y = hsvkernels.conv2d(x.to(dtype), fact.to(dtype), None, 1, 1)
    assert y.dtype == dtype
    assert _rel_err(y, truth) <= (1e-11 if dtype == torch.float64 else 3e-2)


def test_auto_runs_and_backward_stays_composite():
    fact = CASES["svd"].random((6, 4, 3, 3), dtype=torch.float32)
    x = torch.randn(2, 4, 7, 6, requires_grad=True)
    factors = [f.clone().requires_grad_() for f in fact.factors]
    with cpu_env("auto"):
        y = torch.ops.hsv.conv2d(x, factors, None, [2, 2], [1, 1], [1, 1], 1, "svd")
        y.square().sum().backward()
    with cpu_env("composite"):
        x2 = x.detach().clone().requires_grad_()
        f2 = [f.detach().clone().requires_grad_() for f in factors]
        y2 = torch.ops.hsv.conv2d(x2, f2, None, [2, 2], [1, 1], [1, 1], 1, "svd")
        y2.square().sum().backward()
    assert _rel_err(y, y2) <= TOL32
    assert _rel_err(x.grad, x2.grad) <= 1e-4
    for a, b in zip(factors, f2):
        assert _rel_err(a.grad, b.grad) <= 1e-4


def test_invalid_settings_error_clearly():
    fact = CASES["svd"].random((6, 4, 3, 3), dtype=torch.float32)
    x = torch.randn(1, 4, 5, 5)
    with cpu_env("fast"), pytest.raises(ValueError, match="HSV_CPU_IMPL='fast'"):
        hsvkernels.conv2d(x, fact)
    with cpu_env("fused", "sse9"), pytest.raises(ValueError, match="HSV_CPU_ISA='sse9'"):
        hsvkernels.conv2d(x, fact)
    missing = [i for i in ISA_ORDER if i not in ISAS]
    for isa in missing:
        with cpu_env("fused", isa), pytest.raises(RuntimeError, match="does not support"):
            hsvkernels.conv2d(x, fact)


def test_fused_argument_errors_match_composite():
    fact = CASES["svd"].random((6, 4, 3, 3), dtype=torch.float32)
    assert_errors_match_composite(fact.factors, "svd", cin=4)


@st.composite
def conv_specs(draw, cin_max=20, cout_max=40, r_max=40, kernel=4, size=12):
    n, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw) = draw_conv_geometry(draw, kernel=kernel, size=size)
    cin, cout, r = draw(st.integers(1, cin_max)), draw(st.integers(1, cout_max)), draw(st.integers(1, r_max))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "noncontiguous", "channels_last_noncontiguous"]))
    isa = draw(st.sampled_from(ISAS))
    threads = draw(st.sampled_from([1, 2]))
    with_bias = draw(st.booleans())
    return (n, cin, cout, r, h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw), layout, isa, threads, with_bias)


def random_svd_case(spec):
    """conv_specs' draw as the op's input, its arguments (random svd factors), ISA and thread count."""
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation, layout, isa, threads, with_bias = spec
    v = torch.randn(r, cin, kh, kw) / (cin * kh * kw) ** 0.5
    u = torch.randn(cout, r) / r ** 0.5
    x = _make_input(n, cin, h, w, layout)
    bias = torch.randn(cout) if with_bias else None
    return x, ([v, u], bias, list(stride), list(padding), list(dilation), 1, "svd"), isa, threads


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_specs())
def test_fused_vs_composite_random_shapes(spec):
    assert_fused_matches_composite(*random_svd_case(spec))


# Few input channels on wider images (several panels per output row): the few-channel path where it applies.
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_specs(cin_max=8, cout_max=70, r_max=30, kernel=7, size=40))
def test_fused_im2col_panels_random_shapes(spec):
    n, cin, kh, kw, stride = spec[0], spec[1], spec[6], spec[7], spec[8]
    before = im2col_panels_runs()
    assert_fused_matches_composite(*random_svd_case(spec))
    assert (im2col_panels_runs() > before) == (n > 0 and kh * kw > 1 and (cin <= 4 or stride == (1, 1)))


# Conv-stage ranks whose last panel is a narrow one (Panels::tail): AVX-512 cuts
# 112 into 3 x 32 + 16 and 76 into 2 x 32 + 16, AVX2 cuts 40 into 2 x 16 + 8 and
# 56 into 3 x 16 + 8. Each rank under every ISA, on NCHW (staged per tile) and
# channels_last input, 3x3 stride 1 and 2, against float64 truth.
TAIL_RANKS = {"avx512": (112, 76), "avx2": (40, 56), "scalar": (40,)}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
def test_fused_conv_stage_tail_panel(isa, threads):
    from hsvkernels._extension import _C
    with cpu_env("fused", isa, threads):
        for rank in TAIL_RANKS[isa]:
            widths = list(_C.cpu_conv_panel_widths(rank))
            if isa != "scalar":   # the scalar kernel has no narrow variant: no tail
                wide = widths[0]
                assert widths == [wide] * (rank // wide) + [wide // 2], (rank, widths)
            assert sum(widths) >= rank
            v = torch.randn(rank, 24, 3, 3, dtype=torch.float64) / (24 * 9) ** 0.5
            u = torch.randn(40, rank, dtype=torch.float64) / rank ** 0.5
            fact = hsvkernels.Factorization("svd", [v, u], (40, 24, 3, 3))
            for layout in ("contiguous", "channels_last"):
                for stride in (1, 2):
                    _check_against_dense((2, 24, 40, 9, 11, 3, 3, stride, 1, 1), layout, fact=fact)


def test_conv_panel_widths_refuses_a_bad_rank():
    from hsvkernels._extension import _C
    for bad in (0, -3):
        with pytest.raises(ValueError, match="rank must be >= 1, got %d" % bad):
            _C.cpu_conv_panel_widths(bad)
