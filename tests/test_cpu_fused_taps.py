"""The fused CPU conv stage with several kernel taps per microkernel call (MicrokernelTapsFn, tile_conv_taps).

Every conv with more than one tap and more than 8 input channels per group takes it where the ISA's conv kernel
has the taps variant (AVX2 and scalar); HSV_CPU_CONV_TAPS=per_tap restores one call per tap and channel chunk.
Both are checked against F.conv2d in float64 on the dense weight and against each other, and a run counter
says which one ran.
"""
import pytest
import torch
import torch.nn.functional as F
from test_cpu_fused import ISAS, TOL32, _expected_format, _make_input, _rel_err, cpu_env, env_vars
from test_cpu_fused_hsv import _factors

import hsvkernels
from hsvkernels import _extension

pytestmark = pytest.mark.skipif(not hsvkernels.build_info().get("extension"), reason="needs the native extension")

# The ISAs whose conv kernels have the taps variant (AVX-512's is not written: it could not be run here).
TAPS_ISAS = [i for i in ISAS if i != "avx512"]

# n, cin, cout, r, h, w, kh, kw, stride, padding, dilation; the AVX2 grouping in the comment (K budget 1152,
# at most 256 row pointers per call).
SVD_DIMS = [
    (2, 64, 32, 14, 13, 11, 3, 3, 1, 1, 1),                # 9 taps in one call (K 576)
    (1, 130, 24, 20, 9, 7, 3, 3, 2, 1, 1),                 # 5 + 4 taps; rank 20: the 4 x 24 kernel
    (1, 400, 16, 40, 6, 6, 3, 3, 1, 1, 1),                 # 2 taps per call, and a narrow tail panel per tap
    (2, 9, 20, 16, 15, 14, 7, 7, 2, 3, 1),                 # 49 taps: 25 + 24 (row-pointer cap)
    (2, 16, 12, 15, 12, 12, 3, 3, 1, 2, 2),                # dilated, padding 2
    (2, 24, 10, 6, 9, 8, 3, 3, 1, 1, 1),                   # rank 6: AVX2's narrow 6 x 8 kernel
    (1, 12, 8, 14, 5, 7, 5, 3, (2, 1), (3, 0), (1, 2)),    # padding past the kernel's reach, mixed geometry
    (1, 10, 6, 16, 2, 3, 3, 3, 1, 1, 1),                   # image smaller than the kernel
    (0, 32, 8, 14, 6, 6, 3, 3, 1, 1, 1),                   # batch 0: nothing runs
    (1, 32, 16, 14, 5, 5, 1, 1, 1, 0, 1),                  # 1x1: one tap, nothing to group
]
SVD_IDS = ["64ch", "130ch-three", "400ch-tail", "7x7-cap", "dilated", "narrow", "padded", "small-image", "batch0",
           "1x1"]
LAYOUTS = ["contiguous", "channels_last", "noncontiguous", "channels_last_noncontiguous"]


def tap_group_runs():
    return _extension._C.cpu_conv_tap_group_runs()


def check_grouped_and_per_tap(x, fact, bias, stride, padding, dilation, isa, grouped):
    """The op with tap groups (default) and per tap, each against float64 truth, and the counter against
    `grouped` (whether the grouped conv stage must have run)."""
    truth = F.conv2d(x.double(), fact.to_dense(), None if bias is None else bias.double(), stride, padding,
                     dilation)
    f32 = fact.to(torch.float32)
    b32 = None if bias is None else bias.float()
    for threads in (1, 3):
        with cpu_env("fused", isa, threads):
            before = tap_group_runs()
            y = hsvkernels.conv2d(x, f32, b32, stride, padding, dilation)
            assert tap_group_runs() == before + grouped
            with env_vars(HSV_CPU_CONV_TAPS="per_tap"):
                y_per_tap = hsvkernels.conv2d(x, f32, b32, stride, padding, dilation)
            assert tap_group_runs() == before + grouped
        assert y.shape == truth.shape and y.is_contiguous(memory_format=_expected_format(x))
        assert _rel_err(y, truth) <= TOL32
        assert _rel_err(y_per_tap, truth) <= TOL32
        assert _rel_err(y, y_per_tap) <= TOL32


@pytest.mark.parametrize("isa", TAPS_ISAS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dims", SVD_DIMS, ids=SVD_IDS)
def test_svd_tap_groups(dims, layout, isa):
    n, cin, cout, r, h, w, kh, kw, stride, padding, dilation = dims
    v = torch.randn(r, cin, kh, kw, dtype=torch.float64) / (cin * kh * kw) ** 0.5
    u = torch.randn(cout, r, dtype=torch.float64) / r ** 0.5
    fact = hsvkernels.Factorization("svd", [v, u], (cout, cin, kh, kw))
    x = _make_input(n, cin, h, w, layout)
    for bias in (torch.randn(cout, dtype=torch.float64), None):
        check_grouped_and_per_tap(x, fact, bias, stride, padding, dilation, isa, n > 0 and kh * kw > 1)


# (T1, S1, T2, S2, P, q1, q2): channel groups (S1 > 1: per-group patches), T2 > 1, and level 2 (the conv
# stage is B1's, with its own width q1).
HSV_SIZES = [(6, 2, 2, 32, 8, None, None), (4, 3, 3, 24, 5, None, 3), (8, 2, 2, 40, 4, 20, None)]


@pytest.mark.parametrize("isa", TAPS_ISAS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sizes", HSV_SIZES, ids=["S1=2", "S1=3-q2", "q1"])
def test_hsv_tap_groups(sizes, layout, isa):
    T1, S1, T2, S2, P, q1, q2 = sizes
    fact = _factors(T1, S1, T2, S2, P, 3, 3, q1, q2)
    x = _make_input(2, S1 * S2, 9, 10, layout)
    for stride in (1, 2):
        check_grouped_and_per_tap(x, fact, torch.randn(T1 * T2, dtype=torch.float64), stride, 1, 1, isa, True)


def test_avx512_keeps_one_call_per_tap():
    if "avx512" not in ISAS:
        pytest.skip("this CPU has no AVX-512")
    fact = _factors(6, 1, 1, 32, 16, 3, 3).to(torch.float32)
    with cpu_env("fused", "avx512"):
        before = tap_group_runs()
        hsvkernels.conv2d(torch.randn(1, 32, 8, 8), fact, None, 1, 1, 1)
        assert tap_group_runs() == before


def test_bad_setting_is_named():
    fact = _factors(6, 1, 1, 32, 16, 3, 3).to(torch.float32)
    with cpu_env("fused"), env_vars(HSV_CPU_CONV_TAPS="sometimes"):
        with pytest.raises(ValueError, match="HSV_CPU_CONV_TAPS='sometimes' is not one of 'grouped', 'per_tap'"):
            hsvkernels.conv2d(torch.randn(1, 32, 8, 8), fact, None, 1, 1, 1)
