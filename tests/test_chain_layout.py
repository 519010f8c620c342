"""The composite chain keeps a channels_last activation channels_last, at batch 1 too.

Reshaping a batch-1 channels_last tensor to its own shape gives its size-1 batch dim
a new stride, after which the conv backend no longer sees channels_last and copies
the whole activation to NCHW before every stage (10x slower on a 1x1 tucker2 layer).
The chain therefore reshapes only where a stage's view really differs, and so does
the pure-PyTorch reference chain. These tests count the copies made: only weights
(kernel-sized) may be copied.

The other side of keeping channels_last: a stage input with one channel whose channel
stride is not above its column stride is channels_last to ATen, and oneDNN gets some such
convs wrong (test_one_input_channel_at_two_threads); the chain hands those to it as NCHW.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from factories import CASES, KINDS
from torch.profiler import ProfilerActivity, profile

import hsvkernels
import hsvkernels.reference

pytestmark = pytest.mark.skipif(not hsvkernels.build_info().get("extension"), reason="needs the native extension")


def activation_copies(x, fact, padding):
    with torch.inference_mode():
        hsvkernels.conv2d(x, fact, None, 1, padding)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            y = hsvkernels.conv2d(x, fact, None, 1, padding)
    spatial = list(x.shape[2:])
    copies = [e.input_shapes[0] for e in prof.events() if e.name == "aten::copy_"]
    return y, [s for s in copies if len(s) == 4 and s[2:] == spatial]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("kind", ["svd", "tucker2", "ht2", "tt_tucker"])
def test_channels_last_activation_is_never_copied(kind, k, batch, monkeypatch):
    monkeypatch.setenv("HSV_CPU_IMPL", "composite")
    torch.manual_seed(0)
    fact = hsvkernels.decompose(torch.randn(48, 32, k, k), kind, ratio=2)
    x = torch.randn(batch, 32, 12, 12).contiguous(memory_format=torch.channels_last)
    y, copies = activation_copies(x, fact, k // 2)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert copies == [], "the chain copied activations %s" % copies


@pytest.mark.parametrize("kind, options", [("svd", {}), ("hsv", {"split": (48, 1, 1, 32)}), ("tucker2", {})])
def test_reference_path_keeps_batch1_channels_last(kind, options):
    # the pure-PyTorch chain (the oracle and the no-extension fallback) had the same habit
    torch.manual_seed(0)
    fact = hsvkernels.decompose(torch.randn(48, 32, 3, 3), kind, ratio=2, **options)
    x = torch.randn(1, 32, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        y = hsvkernels.reference.conv2d(x, fact, None, 1, 1)
    copies = [e.input_shapes[0] for e in prof.events() if e.name == "aten::copy_"]
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert [s for s in copies if len(s) == 4 and s[2:] == [12, 12]] == [], copies


@contextlib.contextmanager
def _threads(n):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _assert_matches_float64(x, factors, kind, stride):
    """Forward and gradients of the op (float32) against F.conv2d in float64 on the dense weight."""
    x = x.requires_grad_()
    factors = [f.float().requires_grad_() for f in factors]
    y = torch.ops.hsv.conv2d(x, factors, None, list(stride), [0, 0], [1, 1], 1, kind)
    x64 = x.detach().double().requires_grad_()
    f64 = [f.detach().double().requires_grad_() for f in factors]
    ref = F.conv2d(x64, hsvkernels.FORMATS[kind].to_dense(f64), None, stride)
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4), (kind, x.stride(), y, ref)
    g = torch.randn(ref.shape)
    grads = torch.autograd.grad(y, [x, *factors], g)
    grads64 = torch.autograd.grad(ref, [x64, *f64], g.double())
    for i, (a, b) in enumerate(zip(grads, grads64)):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-4), (kind, x.stride(), "grad", i, a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_one_input_channel_at_two_threads(kind, monkeypatch):
    # oneDNN (torch 2.14.1) run channels_last on a 1-channel input (2, 1, 3, 4), weight
    # (r, 1, 2, 4), stride (1, 3) read garbage into every output row but the first at 2
    # threads (1 thread was right at this batch). ATen runs a 1-channel conv channels_last when
    # the channel stride is <= the column stride: a channels_last tensor (12, 1, 4, 1) or a
    # slice of one (24, 1, 8, 2); the chain passes such inputs to conv2d as NCHW views.
    monkeypatch.setenv("HSV_CPU_IMPL", "composite")
    shape = (3, 1, 2, 4)
    if not CASES[kind].supports(shape):
        pytest.skip("kind %s cannot represent shape %s" % (kind, shape))
    inputs = [torch.randn(2, 3, 4, 1).permute(0, 3, 1, 2), torch.randn(2, 3, 8, 1).permute(0, 3, 1, 2)[..., ::2]]
    assert [x.stride() for x in inputs] == [(12, 1, 4, 1), (24, 1, 8, 2)]
    with _threads(2):
        for x in inputs:
            _assert_matches_float64(x, CASES[kind].random(shape).factors, kind, (1, 3))


def test_rank1_stage_after_channels_last_input_at_two_threads(monkeypatch):
    # the same oneDNN case one stage in: a rank-1 tucker2 on a channels_last input gives its
    # core conv a (2, 1, 3, 4) channels_last input
    monkeypatch.setenv("HSV_CPU_IMPL", "composite")
    x = torch.randn(2, 4, 3, 4).contiguous(memory_format=torch.channels_last)
    factors = [torch.randn(1, 4), torch.randn(1, 1, 2, 4), torch.randn(3, 1)]
    with _threads(2):
        _assert_matches_float64(x, factors, "tucker2", (1, 3))


def test_strided_1x1_backward_on_channels_last_does_not_corrupt_the_heap(tmp_path):
    # oneDNN's 1x1 strided backward (torch 2.14.1) writes past a heap buffer on channels_last input with
    # 5 -> 6 channels at stride (1, 2) (valgrind); at one thread a later free() aborted within ~3000
    # calls, every run. The chain hands it NCHW there. A subprocess, as a corrupt heap aborts the process.
    import os
    import subprocess
    import sys
    script = tmp_path / "loop.py"
    script.write_text(
        "import torch, hsvkernels\n"
        "torch.manual_seed(0)\n"
        "v = torch.randn(3, 5, 1, 1, requires_grad=True); u = torch.randn(6, 3, requires_grad=True)\n"
        "for stride in ((1, 2), (2, 2), (2, 1)):\n"
        "    for i in range(1500):\n"
        "        x = torch.randn(2, 5, 4, 12).contiguous(memory_format=torch.channels_last).requires_grad_()\n"
        "        y = torch.ops.hsv.conv2d(x, [v, u], None, stride, (0, 0), (1, 1), 1, 'svd')\n"
        "        torch.autograd.grad(y, [x, v, u], torch.randn(y.shape))\n"
        "print('survived')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HSV_CPU_IMPL="fused",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert out.returncode == 0 and "survived" in out.stdout, (out.returncode, out.stderr[-2000:])
