"""FactorizedConv2d: from_conv, padding variants, padding modes, refusals, to_dense, state_dict."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hsvkernels
from hsvkernels import FactorizedConv2d

CONVS = [
    dict(in_channels=8, out_channels=16, kernel_size=3, padding=1),
    dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=8, out_channels=12, kernel_size=(3, 1), padding=(1, 0)),
    dict(in_channels=8, out_channels=12, kernel_size=3, padding="same"),
    dict(in_channels=8, out_channels=12, kernel_size=4, padding="same"),           # asymmetric 'same'
    dict(in_channels=8, out_channels=12, kernel_size=(2, 3), padding="same", dilation=(3, 1)),
    dict(in_channels=8, out_channels=12, kernel_size=3, padding="valid"),
    dict(in_channels=8, out_channels=12, kernel_size=3, padding=2, dilation=2),
    dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=8, out_channels=12, kernel_size=3, padding=(1, 2), padding_mode="circular"),
    dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, padding_mode="replicate"),
    dict(in_channels=8, out_channels=12, kernel_size=1),
]


@pytest.mark.parametrize("cfg", CONVS, ids=[str(i) for i in range(len(CONVS))])
def test_full_rank_layer_equals_conv(cfg):
    conv = nn.Conv2d(**cfg).double()
    k = conv.kernel_size
    layer = FactorizedConv2d.from_conv(conv, method="svd", rank=min(conv.out_channels, conv.in_channels * k[0] * k[1]))
    x = torch.randn(2, 8, 11, 10, dtype=torch.float64)
    assert (layer(x) - conv(x)).abs().max().item() < 1e-11
    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d) and dense.padding == conv.padding and dense.padding_mode == conv.padding_mode
    assert (dense(x) - conv(x)).abs().max().item() < 1e-11


def test_truncated_layer_equals_its_own_dense_kernel():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    layer = FactorizedConv2d.from_conv(conv, method="svd", ratio=4)
    assert layer.factorization.compression() >= 4
    x = torch.randn(2, 16, 9, 9)
    torch.testing.assert_close(layer(x), layer.to_dense()(x), rtol=1e-4, atol=1e-5)
    assert "kind=svd" in repr(layer) and "rank=" in repr(layer)


def test_conv_attributes_and_state_dict():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    layer = FactorizedConv2d.from_conv(conv, method="svd", rank=4)
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.groups) == \
        (8, 16, (3, 3), (2, 2), 1)
    sd = layer.state_dict()
    assert set(sd) == {"factors.0", "factors.1", "bias"}
    clone = FactorizedConv2d(hsvkernels.Factorization("svd", [torch.zeros(4, 8, 3, 3), torch.zeros(16, 4)],
                                                      (16, 8, 3, 3)), stride=2, padding=1, bias=torch.zeros(16))
    clone.load_state_dict(sd)
    x = torch.randn(1, 8, 8, 8)
    torch.testing.assert_close(clone(x), layer(x))


def test_factors_train():
    layer = FactorizedConv2d.from_conv(nn.Conv2d(4, 8, 3, padding=1), method="svd", rank=2)
    layer(torch.randn(2, 4, 6, 6)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_refusals():
    with pytest.raises(ValueError, match="grouped convolution"):
        FactorizedConv2d.from_conv(nn.Conv2d(8, 8, 3, groups=2), method="svd", rank=2)
    with pytest.raises(TypeError, match="nn.Conv2d"):
        FactorizedConv2d.from_conv(nn.Linear(3, 3), method="svd", rank=1)
    fact = hsvkernels.decompose(torch.randn(8, 4, 3, 3), "svd", rank=2)
    with pytest.raises(ValueError, match="padding_mode"):
        FactorizedConv2d(fact, padding_mode="mirror")
    with pytest.raises(ValueError, match="padding must be 'same', 'valid'"):
        FactorizedConv2d(fact, padding="full")
    with pytest.raises(ValueError, match="not supported for strided"):
        FactorizedConv2d(fact, stride=2, padding="same")
    with pytest.raises(ValueError, match="bias must have shape"):
        FactorizedConv2d(fact, bias=torch.zeros(3))


def test_channels_last_module_output():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = FactorizedConv2d.from_conv(conv, method="svd", rank=8)
    x = torch.randn(2, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.conv2d(x, layer.weight, layer.bias, padding=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["hsv", "kcp", "svd"])
def test_model_to_channels_last(method, tmp_path):
    # Module.to(memory_format=channels_last) refuses 5-D tensors, and hsv's B factor is 5-D: the
    # layer passes such factors through a 4-D view, so a converted model takes the format like any CNN.
    model = _fresh_model().eval()
    hsvkernels.convert_(model, method, ratio=4, min_params=0, progress=False)
    shapes = [tuple(p.shape) for p in model.parameters()]
    if method == "hsv":
        assert 5 in [len(s) for s in shapes]
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        y = model(x)
        model.to(memory_format=torch.channels_last)
        assert [tuple(p.shape) for p in model.parameters()] == shapes
        y_cl = model(x.contiguous(memory_format=torch.channels_last))
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-5)
    hsvkernels.save(model, str(tmp_path / "cl"))
    with torch.no_grad():
        torch.testing.assert_close(hsvkernels.load(str(tmp_path / "cl"), _fresh_model())(x), y, rtol=1e-4, atol=1e-5)


def test_apply_still_raises_what_a_view_cannot_fix():
    layer = FactorizedConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), method="svd", rank=4)  # 4-D factors

    def refuse(t):
        raise RuntimeError("refused a %d-D tensor" % t.dim())

    with pytest.raises(RuntimeError, match="refused a 4-D tensor"):
        layer._apply(refuse)
    hsv = FactorizedConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), method="hsv", ratio=4)
    assert hsv.factors[0].dim() == 5
    with pytest.raises(RuntimeError, match="refused a 5-D tensor"):  # the error about the tensor itself
        hsv._apply(refuse)


def _fresh_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))


def test_built_under_inference_mode_factors_are_ordinary_tensors(tmp_path):
    # Factors made under torch.inference_mode would be inference tensors: no version counter, so
    # the fused kernels could never cache their packed form. The layer makes its own, everywhere.
    saved = _fresh_model()
    hsvkernels.convert_(saved, "hsv", ratio=4, min_params=0, progress=False)
    hsvkernels.save(saved, str(tmp_path / "saved"))
    with torch.inference_mode():
        layer = FactorizedConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), method="hsv", ratio=4)
        converted = _fresh_model()
        hsvkernels.convert_(converted, "hsv", ratio=4, min_params=0, progress=False)
        loaded = hsvkernels.load(str(tmp_path / "saved"), _fresh_model())
    for m in (layer, converted, loaded):
        factorized = [c for c in m.modules() if isinstance(c, FactorizedConv2d)]
        assert factorized and not any(p.is_inference() for c in factorized for p in c.parameters())
    if hsvkernels.HAS_EXTENSION:
        from hsvkernels import _C  # the fused kernels' packed-factor cache
        _C.clear_packed_cache()
        with torch.inference_mode():
            layer(torch.randn(1, 8, 9, 9))
        assert _C.packed_cache_size() > 0, "the layer's packed factors were not cached"


@pytest.mark.skipif(not hsvkernels.HAS_EXTENSION, reason="without _C nothing is packed or cached: no warning")
def test_inference_tensor_factors_warn_once(monkeypatch):
    from hsvkernels import ops
    monkeypatch.setattr(ops, "_inference_factors_warned", False)
    layer = FactorizedConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), method="svd", ratio=4)
    x = torch.randn(1, 8, 9, 9)
    with torch.inference_mode():
        layer.double().float()  # Module._apply under inference_mode: new, inference-tensor parameters
        assert layer.factors[0].is_inference()
        with pytest.warns(UserWarning, match="inference tensors .* repack them on every call"):
            y = layer(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.testing.assert_close(layer(x), y)  # once per process


def test_unbatched_input_like_nn_conv2d():
    # nn.Conv2d takes (C, H, W); a drop-in replacement must too
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, stride=2)
    layer = FactorizedConv2d.from_conv(conv, method="svd", rank=4)
    x = torch.randn(4, 9, 7)
    y = layer(x)
    assert y.shape == conv(x).shape == (8, 5, 4)
    assert torch.allclose(y, layer(x.unsqueeze(0))[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(y, layer.to_dense()(x), rtol=1e-4, atol=1e-5)


def test_constructor_and_weights_are_checked_before_forward():
    fact = hsvkernels.decompose(torch.randn(8, 4, 3, 3), "svd", rank=2)
    for kwargs, message in ((dict(stride=0), r"stride must be >= 1, got \(0, 0\)"),
                            (dict(dilation=(1, -1)), r"dilation must be >= 1, got \(1, -1\)"),
                            (dict(padding=-1), r"padding must be >= 0, got \(-1, -1\)")):
        with pytest.raises(ValueError, match=message):
            FactorizedConv2d(fact, **kwargs)
    with pytest.raises(ValueError, match="weight is on the meta device"):
        hsvkernels.decompose(torch.empty(8, 4, 3, 3, device="meta"), "svd", rank=2)
    with pytest.raises(TypeError, match="revert_ expects an nn.Module, got int"):
        hsvkernels.revert_(5)
