"""hsv::conv2d_epilogue on every CPU path: the tail applied per output tile by the general fused kernel
(NHWC and NCHW output, tiles that cross images, hsv levels 1 and 2), after the kernel on the other paths
(pointwise_nchw, im2col_panels, kcp, tucker2, the composite chain), under each ISA, thread count and
HSV_CPU_IMPL. Each is checked bit for bit against the same kernel's conv2d followed by add and ReLU.
"""
import pytest
import torch
from factories import CASES
from hsv_case import random_factors
from test_cpu_fused import ISAS, cpu_env, im2col_panels_runs, pointwise_runs

import hsvkernels

INFO = hsvkernels.build_info()
pytestmark = pytest.mark.skipif(not INFO.get("extension"), reason="needs the native extension")

# (N, Cin, Cout, H, W, k, stride, padding)
GEOMETRIES = {
    "3x3": (3, 24, 40, 17, 19, 3, 1, 1),     # tiles cross images
    "stride2": (2, 16, 24, 15, 13, 3, 2, 1),
    "1x1": (2, 32, 48, 9, 11, 1, 1, 0),       # NCHW: pointwise_nchw
    "stem": (2, 3, 16, 23, 21, 7, 2, 3),      # few input channels: im2col_panels
    "batch1": (1, 8, 8, 5, 6, 3, 1, 1),
}


def _run(kind, factors, cout, x, residual, relu, stride, padding):
    """(conv2d_epilogue, conv2d then add and ReLU), both with a bias."""
    args = ([stride, stride], [padding, padding], [1, 1], 1, kind)
    bias = torch.linspace(-1, 1, cout)
    conv = torch.ops.hsv.conv2d(x, factors, bias, *args)
    y = torch.ops.hsv.conv2d_epilogue(x, factors, bias, residual, *args[:4], kind, relu)
    expected = conv + residual if residual is not None else conv
    return y, expected.relu() if relu else expected


def _factors(kind, cout, cin, k, level):
    torch.manual_seed(cout * 1000 + cin)
    if kind == "hsv":
        return [f.float() for f in random_factors((cout, cin, k, k), dtype=torch.float32, layout=level,
                                                  rank=4).factors]
    return [f.float() for f in CASES[kind].random((cout, cin, k, k)).factors]


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind, level", [("svd", None), ("hsv", "level1"), ("hsv", "q1q2")])
def test_epilogue_per_tile_bitwise(kind, level, layout, geometry, threads, isa):
    n, cin, cout, h, w, k, stride, padding = GEOMETRIES[geometry]
    factors = _factors(kind, cout, cin, k, level)
    x = _layout(torch.randn(n, cin, h, w), layout)
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    with cpu_env("fused", isa, threads):
        for res_layout in ["contiguous", "channels_last"]:
            residual = _layout(torch.randn(n, cout, ho, wo), res_layout)
            for res, relu in [(residual, True), (None, True), (residual, False)]:
                y, expected = _run(kind, factors, cout, x, res, relu, stride, padding)
                assert y.stride() == expected.contiguous(memory_format=torch.channels_last if layout ==
                                                         "channels_last" else torch.contiguous_format).stride()
                assert torch.equal(y, expected), (res_layout, res is not None, relu)


def test_epilogue_runs_on_the_other_fused_paths():
    # 1x1 NCHW and the stem take their own kernels; the tail then runs after them
    with cpu_env("fused"):
        for geometry, counter in [("1x1", pointwise_runs), ("stem", im2col_panels_runs)]:
            n, cin, cout, h, w, k, stride, padding = GEOMETRIES[geometry]
            factors = _factors("svd", cout, cin, k, None)
            x = torch.randn(n, cin, h, w)
            residual = torch.randn(n, cout, (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1)
            before = counter()
            y, expected = _run("svd", factors, cout, x, residual, True, stride, padding)
            assert counter() > before, geometry
            assert torch.equal(y, expected)


@pytest.mark.parametrize("impl", ["composite", "auto", "fused"])
@pytest.mark.parametrize("kind", ["svd", "hsv", "kcp", "tucker2", "ht2", "tt_tucker", "cp", "tt"])
def test_epilogue_each_impl_and_kind(kind, impl):
    n, cin, cout, h, w, k, stride, padding = GEOMETRIES["3x3"]
    shape = (cout, cin, k, k)
    if kind not in hsvkernels.FORMATS or not CASES[kind].supports(shape):
        pytest.skip("kind %s cannot represent %s" % (kind, shape))
    factors = _factors(kind, cout, cin, k, "level1")
    for layout in ["contiguous", "channels_last"]:
        x = _layout(torch.randn(n, cin, h, w), layout)
        residual = torch.randn(n, cout, h, w)
        with cpu_env(impl):
            y, expected = _run(kind, factors, cout, x, residual, True, stride, padding)
            if impl == "auto":  # the first call times both paths; the next one runs the one kept
                y, expected = _run(kind, factors, cout, x, residual, True, stride, padding)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["composite", "fused"])
def test_epilogue_residual_checked_on_every_path(impl):
    n, cin, cout, h, w, k, stride, padding = GEOMETRIES["3x3"]
    factors = _factors("svd", cout, cin, k, None)
    x = torch.randn(n, cin, h, w)
    with cpu_env(impl):
        for bad in [torch.randn(n, cout, h, 1), torch.randn(1, cout, h, w), torch.randn(n, cout, h, w).double()]:
            with pytest.raises(ValueError, match="hsv::conv2d_epilogue: residual"):
                torch.ops.hsv.conv2d_epilogue(x, factors, None, bad, [1, 1], [1, 1], [1, 1], 1, "svd", True)
