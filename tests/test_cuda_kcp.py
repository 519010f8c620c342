"""The fused kcp CUDA kernel (csrc/ops/cuda/kcp_cuda.cu) on a GPU, where it runs
only with HSV_CUDA_KCP=on: against float64 truth, the composite chain and the CPU
emulator of the same CTA program (test_kcp_cta_emulate.py), on the emulator's
geometries in every layout; off by default; falls back where it does not apply;
CUDA graphs and torch.compile.
"""
import pytest
import torch
from conftest import requires_cuda
from factories import kcp_factors
from test_cuda_fused import check_fused, impl, launches, make_input, rel_err  # noqa: F401 (impl is a fixture)
from test_kcp_cta_emulate import CASES, SUITE

import hsvkernels

INFO = hsvkernels.build_info()
pytestmark = [
    requires_cuda,
    pytest.mark.cuda,
    pytest.mark.skipif(not INFO.get("with_cuda"), reason="the native extension was built without CUDA kernels"),
]

DTYPES = [torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "noncontiguous", "channels_last_noncontiguous"]
# of max |truth|, as in test_kcp_cta_emulate.py: four rounded intermediates in the chain
TOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _C():
    from hsvkernels._extension import _C
    return _C


def kcp_launches():
    return _C().cuda_kcp_launch_count()


@pytest.fixture(autouse=True)
def _needs_sm80():
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the kcp kernel needs compute capability 8.0 (bf16 tensor cores)")


@pytest.fixture
def kcp_on(monkeypatch):
    monkeypatch.setenv("HSV_CUDA_KCP", "on")


def case_inputs(case, dtype, layout, merged=False, batch=None):
    sizes, stride, padding, dilation, (b, h, w) = CASES[case]
    q, n, s1, r, s2, t1, t2, kh, kw = sizes
    fact = kcp_factors(*sizes, merged=merged, seed=case)
    x = make_input(b if batch is None else batch, s1 * s2, h, w, layout, dtype)
    return fact, x, torch.randn(t1 * t2, dtype=torch.float64), (stride, padding, dilation)


def run_kcp(impl, fact, x, bias, geom, expect=True):
    """check_fused (fused and composite against float64 truth and each other), plus the kcp counter."""
    before = kcp_launches()
    y = check_fused(impl, fact, x, bias, *geom, expect_fused=expect)
    ran = kcp_launches() - before
    assert ran == (1 if expect and x.shape[0] > 0 else 0), "kcp kernel launches: %d" % ran
    return y


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("merged", [False, True], ids=["six", "merged"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_kcp_matches_truth_composite_and_emulator(case, merged, dtype, layout, impl, kcp_on):
    fact, x, bias, geom = case_inputs(case, dtype, layout, merged)
    y = run_kcp(impl, fact, x, bias, geom)
    truth = torch.nn.functional.conv2d(x.double().cpu(), fact.to_dense(), bias, *geom)
    assert rel_err(y, truth) <= TOL[dtype]
    # the same CTA program on the CPU: the same products and rounding points, so only the fp32 summation
    # order inside the tensor-core tiles (and the tile, where the device is not an H100) may differ
    stride, padding, dilation = ([v, v] if isinstance(v, int) else list(v) for v in geom)
    emu = _C().kcp_cta_emulate(x.cpu(), fact.to(dtype=dtype).factors, bias.to(dtype), stride, padding, dilation)
    torch.testing.assert_close(y.cpu(), emu, rtol=1e-2, atol=1e-2 * emu.abs().max().item())


@pytest.mark.parametrize("batch", [0, 1, 7])
def test_fused_kcp_batch_sizes(batch, impl, kcp_on):
    fact, x, bias, geom = case_inputs(1, torch.bfloat16, "channels_last", batch=batch)
    run_kcp(impl, fact, x, bias, geom)


def test_kcp_kernel_is_off_by_default(impl, monkeypatch):
    monkeypatch.delenv("HSV_CUDA_KCP", raising=False)
    fact, x, bias, geom = case_inputs(0, torch.bfloat16, "channels_last")
    run_kcp(impl, fact, x, bias, geom, expect=False)
    monkeypatch.setenv("HSV_CUDA_KCP", "off")
    run_kcp(impl, fact, x, bias, geom, expect=False)


@pytest.mark.parametrize("what", ["fp32", "S2 = 8", "T2 = 8"])
def test_kcp_falls_back_where_the_kernel_does_not_apply(what, impl, kcp_on):
    sizes = {"fp32": (1, 4, 2, 8, 16, 2, 16, 3, 3), "S2 = 8": (1, 4, 2, 8, 8, 2, 16, 3, 3),
             "T2 = 8": (1, 4, 2, 8, 16, 2, 8, 3, 3)}[what]
    fact = kcp_factors(*sizes)
    dtype = torch.float32 if what == "fp32" else torch.bfloat16
    x = make_input(2, sizes[2] * sizes[4], 9, 9, "channels_last", dtype)
    run_kcp(impl, fact, x, None, (1, 1, 1), expect=False)


def test_bad_kcp_value_errors(impl, monkeypatch):
    impl("fused")
    monkeypatch.setenv("HSV_CUDA_KCP", "yes")
    fact, x, bias, geom = case_inputs(0, torch.bfloat16, "channels_last")
    with pytest.raises(ValueError, match="HSV_CUDA_KCP"):
        hsvkernels.conv2d(x, fact.to("cuda", torch.bfloat16), None, *geom)


def test_kcp_factors_follow_in_place_updates_and_graphs(impl, kcp_on):
    # The packed factors are cached against the factors' versions; in a graph they are repacked per replay.
    fact, x, _, geom = case_inputs(0, torch.bfloat16, "channels_last")
    fact = fact.to("cuda", torch.bfloat16)

    def composite():
        impl("composite")
        y = hsvkernels.conv2d(x, fact, None, *geom)
        impl("fused")
        return y
    impl("fused")
    y1 = hsvkernels.conv2d(x, fact, None, *geom)
    with torch.no_grad():
        fact.factors[5].mul_(-2.0)
    y2 = hsvkernels.conv2d(x, fact, None, *geom)
    assert rel_err(y2, composite().double()) <= TOL[torch.bfloat16]
    assert rel_err(y1, composite().double()) > 0.5
    g = torch.cuda.CUDAGraph()
    before = kcp_launches()
    with torch.cuda.graph(g):
        static_y = hsvkernels.conv2d(x, fact, None, *geom)
    assert kcp_launches() - before == 1
    with torch.no_grad():
        fact.factors[2].add_(0.25)   # a depthwise factor, packed to fp32
        x.mul_(0.5)
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(static_y, composite().double()) <= TOL[torch.bfloat16]


def test_kcp_on_a_side_stream(impl, kcp_on):
    impl("fused")
    fact, x, bias, geom = case_inputs(0, torch.float16, "channels_last")
    fact, bias = fact.to("cuda", torch.float16), bias.to("cuda", torch.float16)
    expected = hsvkernels.conv2d(x, fact, bias, *geom)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = hsvkernels.conv2d(x, fact, bias, *geom)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(y, expected)   # no atomics: the same answer bit for bit


def test_kcp_under_compile_reduce_overhead(impl, kcp_on):
    impl("fused")
    torch._dynamo.reset()
    sizes, stride, padding, dilation, (b, h, w) = CASES[0]
    layer = hsvkernels.FactorizedConv2d(kcp_factors(*sizes), stride, padding, dilation)
    layer = layer.to("cuda", torch.bfloat16)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    x = make_input(4, sizes[2] * sizes[4], h, w, "channels_last", torch.bfloat16)
    before = launches()
    for _ in range(3):
        y = compiled(x)
    assert launches() > before
    assert rel_err(y, layer(x).double()) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("layer", sorted(SUITE))
def test_kcp_on_the_layer_suite_shapes(layer, impl, kcp_on):
    # the full-size layers bench/cuda_nhwc_sweep.py --kcp times, against float64 truth and composite
    (q, n, s1, r, s2, t1, t2), h, stride = SUITE[layer]
    fact = kcp_factors(q, n, s1, r, s2, t1, t2, 3, 3, seed=h)
    x = make_input(8, s1 * s2, h, h, "channels_last", torch.bfloat16)
    run_kcp(impl, fact, x, torch.randn(t1 * t2, dtype=torch.float64), (stride, 1, 1))
    tile_h, tile_w, nb, splits, smem = _C().cuda_kcp_last_config()
    assert (tile_h * tile_w) % 16 == 0 and nb % 16 == 0 and 0 < smem <= 232448   # 227 KiB: sm_90's opt-in


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kcp_split_over_ctas_at_batch_1(dtype, impl, kcp_on):
    # layer4 at batch 1: 4 tiles, so the cost model splits the qn blocks (a second launch sums the splits)
    (q, n, s1, r, s2, t1, t2), h, stride = SUITE["L4"]
    fact = kcp_factors(q, n, s1, r, s2, t1, t2, 3, 3)
    for layout in ("channels_last", "contiguous"):
        run_kcp(impl, fact, make_input(1, s1 * s2, h, h, layout, dtype), torch.randn(t1 * t2, dtype=torch.float64),
                (1, 1, 1))
        assert _C().cuda_kcp_last_config()[3] > 1
