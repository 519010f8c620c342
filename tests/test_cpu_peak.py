"""The FMA-peak and microkernel microbenchmarks (hsvkernels._C.fma_peak_gflops / microkernel_gflops).

Only sanity here (positive, finite, ordered ISAs, clear errors): the numbers
themselves are machine- and load-dependent and go to bench/results/.
"""
import math
import sys

import pytest
import torch

import hsvkernels

INFO = hsvkernels.build_info()
pytestmark = pytest.mark.skipif(not INFO.get("extension"), reason="needs the native extension")
_RANK = {"avx512": 2, "avx2": 1, "scalar": 0}
ISAS = [i for i in ("avx512", "avx2", "scalar") if INFO.get("extension") and _RANK[i] <= _RANK[INFO["cpu_isa"]]]


@pytest.mark.parametrize("isa", ISAS)
def test_peak_and_microkernel_rates_are_sane(isa):
    peak = hsvkernels._C.fma_peak_gflops(isa, 0.05)
    assert math.isfinite(peak) and peak > 0.1
    uk = hsvkernels._C.microkernel_gflops(isa, 64, 0.05)
    assert math.isfinite(uk) and uk > 0.0
    # Best-of-chunks rates on a shared machine: allow generous slack, but a
    # microkernel far above the FMA peak would mean one of them miscounts FLOPs.
    # A short peak run can be disturbed in every chunk: re-measure before failing.
    if uk >= 1.5 * peak:
        peak = max(peak, hsvkernels._C.fma_peak_gflops(isa, 0.5))
    assert uk < 1.5 * peak
    # (the scalar strided kernel vectorizes (SSE), so the scalar peak does not bound it; it runs, below)
    variants = {"avx512": ("narrow", "three", "strided", "strided_short", "b_rows", "b_rows_short"),
                "avx2": ("narrow", "three", "strided", "strided_short", "b_rows", "b_rows_short", "taps"),
                "scalar": ("taps",)}[isa]
    for variant in variants:
        rate = hsvkernels._C.microkernel_gflops(isa, 64, 0.05, variant=variant)
        if rate >= 1.5 * peak:
            peak = max(peak, hsvkernels._C.fma_peak_gflops(isa, 0.5))
        assert 0.0 < rate < 1.5 * peak, variant


def test_microkernel_variant_errors():
    with pytest.raises(ValueError, match="variant must be 'wide', 'narrow', 'three', 'strided', 'strided_short', "
                                         "'b_rows', 'b_rows_short' or 'taps', got 'tall'"):
        hsvkernels._C.microkernel_gflops(ISAS[-1], 64, 0.01, variant="tall")
    with pytest.raises(ValueError, match="the scalar microkernel has no three variant"):
        hsvkernels._C.microkernel_gflops("scalar", 64, 0.01, variant="three")
    assert hsvkernels._C.microkernel_gflops("scalar", 64, 0.01, variant="strided") > 0.0
    with pytest.raises(ValueError, match="the scalar microkernel has no strided_short variant"):
        hsvkernels._C.microkernel_gflops("scalar", 64, 0.01, variant="strided_short")
    assert hsvkernels._C.microkernel_gflops("scalar", 64, 0.01, variant="b_rows") > 0.0
    with pytest.raises(ValueError, match="the scalar microkernel has no b_rows_short variant"):
        hsvkernels._C.microkernel_gflops("scalar", 64, 0.01, variant="b_rows_short")


def test_wider_isa_has_higher_peak():
    if "avx512" not in ISAS:
        pytest.skip("needs AVX-512")
    # 16 fp32 lanes against 1: far more than any load on a shared machine can hide.
    assert hsvkernels._C.fma_peak_gflops("avx512", 0.2) > 1.2 * hsvkernels._C.fma_peak_gflops("scalar", 0.1)


def test_bad_arguments_error_clearly():
    with pytest.raises(ValueError, match="isa='sse9'"):
        hsvkernels._C.fma_peak_gflops("sse9", 0.01)
    with pytest.raises(ValueError, match="k must be >= 1"):
        hsvkernels._C.microkernel_gflops("scalar", 0, 0.01)
    with pytest.raises(ValueError, match="no narrow variant"):
        hsvkernels._C.microkernel_gflops("scalar", 8, 0.01, variant="narrow")


def test_fused_kernels_can_use_threads():
    # at::parallel_for is inline OpenMP code under an OpenMP torch: an extension
    # built without -fopenmp runs every fused kernel on one thread, silently.
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        assert INFO["cpu_openmp"] is True
