"""FactorizedConv2d: from_conv, padding variants, padding modes, refusals, to_dense, state_dict."""
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
