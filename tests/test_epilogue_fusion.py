"""hsvkernels.epilogue.fuse_epilogues: which conv tails it fuses, and that the fused model computes the same."""
import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import hsvkernels
from hsvkernels.epilogue import EpilogueConv2d, fuse_epilogues, fused_epilogues


def _fconv(cin, cout, k=3, stride=1, seed=0):
    torch.manual_seed(seed)
    return hsvkernels.FactorizedConv2d.from_conv(nn.Conv2d(cin, cout, k, stride, k // 2), "svd", ratio=2)


class Tails(nn.Module):
    """One conv per tail spelling fx can see."""

    def __init__(self):
        super().__init__()
        self.c = nn.ModuleList(_fconv(8, 8, seed=i) for i in range(9))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        c = self.c
        a = self.relu(c[0](x) + x)                 # add, then a shared ReLU module: add+relu
        b = F.relu(torch.add(x, c[1](a)))          # residual first, torch.add, F.relu: add+relu
        d = c[2](b).add(a).relu_()                 # methods: add+relu
        e = torch.relu(c[3](d))                    # relu
        t = c[4](e)
        f = t + e                                  # t has two users: nothing fused for c[4]
        g = t * 2 + f
        h = c[5](g) + c[6](g)                      # the first conv to run takes the other as residual: add
        i = operator.iadd(c[7](h), h)              # iadd, no ReLU after: add
        j = c[8](i)                                # no tail
        return j + 1.0                             # a constant: not a residual


def test_fuses_each_tail_spelling():
    model = Tails().eval()
    gm = fuse_epilogues(model)
    assert fused_epilogues(gm) == {"c.0": "add+relu", "c.1": "add+relu", "c.2": "add+relu", "c.3": "relu",
                                   "c.5": "add", "c.7": "add"}
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)
    assert not any(isinstance(m, EpilogueConv2d) for m in model.modules())  # the model itself is untouched


def test_shares_parameters_and_state_dict_keys():
    model = Tails()
    gm = fuse_epilogues(model)
    assert gm.get_submodule("c.0").factors[0] is model.c[0].factors[0]
    assert gm.get_submodule("c.0").bias is model.c[0].bias
    assert set(gm.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        model.c[0].factors[0].mul_(2)  # an update through the model reaches the fused module
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)


def test_training_grads_match_unfused():
    model = Tails().double().train()
    gm = fuse_epilogues(model)
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    params = list(model.parameters())
    g1 = torch.autograd.grad(model(x).square().sum(), params)
    g2 = torch.autograd.grad(gm(x).square().sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class Block(nn.Module):
    def __init__(self, bn=False, shared=False):
        super().__init__()
        self.conv = _fconv(8, 8)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.shared = shared

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)) + x)
        return F.relu(self.conv(y)) if self.shared else y


def test_looks_through_identity_but_not_batch_norm():
    assert fused_epilogues(fuse_epilogues(Block())) == {"conv": "add+relu"}
    assert fused_epilogues(fuse_epilogues(Block(bn=True).eval())) == {}


def test_conv_called_twice_is_not_fused():
    model = Block(shared=True)
    gm = fuse_epilogues(model)
    assert fused_epilogues(gm) == {}
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _fconv(8, 8)
        self.scale = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        pooled = self.scale(x.mean((2, 3), keepdim=True))   # (N, C, 1, 1): an add fx cannot tell from a residual
        return F.relu(self.conv(x) + pooled)


def test_residual_that_broadcasts_runs_unfused():
    model = Broadcast()
    gm = fuse_epilogues(model)
    assert fused_epilogues(gm) == {"conv": "add+relu"}
    x = torch.randn(2, 8, 6, 5)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)
    # and a residual of another dtype promotes as the add would
    layer = gm.get_submodule("conv")
    r = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    assert layer(x, r).dtype == torch.float64


@pytest.mark.parametrize("name, counts", [("resnet18", {"relu": 9, "add+relu": 8}),  # the stem too
                                          ("resnet50", {"relu": 33, "add+relu": 16})])
def test_torchvision_resnet_after_fold(name, counts):
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    hsvkernels.convert_(model, "svd", ratio=4, fold_bn=True, progress=False)
    gm = fuse_epilogues(model)
    tails = list(fused_epilogues(gm).values())
    assert {t: tails.count(t) for t in set(tails)} == counts
    for layout in [torch.contiguous_format, torch.channels_last]:
        x = torch.randn(2, 3, 64, 64).contiguous(memory_format=layout)
        with torch.inference_mode():
            torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    gm = gm.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_explicit_padding_modes_fuse():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    model = nn.Sequential(hsvkernels.FactorizedConv2d.from_conv(conv, "svd", ratio=2), nn.ReLU())
    gm = fuse_epilogues(model)
    assert fused_epilogues(gm) == {"0": "relu"}
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)


def test_export_of_fused_model_has_only_standard_ops():
    model = Block().eval()
    gm = fuse_epilogues(model)
    x = torch.randn(1, 8, 6, 6)
    program = hsvkernels.export.export(gm, (x,))
    assert hsvkernels.export.hsv_ops_in(program) == []
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(hsvkernels.export.missing_packages("onnx", "onnxscript", "onnxruntime") != [],
                    reason="needs onnx, onnxscript and onnxruntime (requirements-dev.txt installs them)")
def test_onnx_of_fused_model(tmp_path):
    model = Block().eval()
    x = torch.randn(2, 8, 6, 6)
    hsvkernels.export.to_onnx(fuse_epilogues(model), (x,), str(tmp_path / "m.onnx"))
    assert hsvkernels.export.compare_onnx(str(tmp_path / "m.onnx"), model, (x,))["max_rel"] < 1e-5


def test_fused_model_compiles():
    model = Block().eval()
    gm = fuse_epilogues(model)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(gm, fullgraph=True, backend="eager")(x), model(x), rtol=0, atol=0)


def test_save_refuses_fused_model(tmp_path):
    model = Block().eval()
    gm = fuse_epilogues(model)
    with pytest.raises(ValueError, match="save: the model went through fuse_epilogues"):
        hsvkernels.save(gm, tmp_path / "fused")
    assert not (tmp_path / "fused").exists()
    assert hsvkernels.save(model, tmp_path / "plain", model_ref="torchvision:resnet18")["layers"]


class Untraceable(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_bad_input():
    with pytest.raises(TypeError, match="fuse_epilogues expects an nn.Module"):
        fuse_epilogues(lambda x: x)
    with pytest.raises(RuntimeError, match="torch.fx could not trace Untraceable"):
        fuse_epilogues(Untraceable())
    with pytest.raises(TypeError, match="from_factorized expects a FactorizedConv2d"):
        EpilogueConv2d.from_factorized(nn.Conv2d(2, 2, 1), adds=False, relu=True)
