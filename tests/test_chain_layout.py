"""The composite chain keeps a channels_last activation channels_last, at batch 1 too.

Reshaping a batch-1 channels_last tensor to its own shape gives its size-1 batch dim
a new stride, after which the conv backend no longer sees channels_last and copies
the whole activation to NCHW before every stage (10x slower on a 1x1 tucker2 layer).
The chain therefore reshapes only where a stage's view really differs, and so does
the pure-PyTorch reference chain. These tests count the copies made: only weights
(kernel-sized) may be copied.
"""
import pytest
import torch
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
