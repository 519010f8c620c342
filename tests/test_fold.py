"""convert_(fold_bn=True): which BatchNorm2d layers fold, exactness, save/load and revert_ of folded models."""
import copy
import json

import pytest
import torch
from torch import nn

from hsvkernels import FactorizedConv2d, convert_, io, revert_
from hsvkernels.fold import FoldedBatchNorm, conv_bn_pairs, fold_batch_norms_, fold_into_conv_
from hsvkernels.io import SaveFileError

FAST = dict(progress=False, decompose_threads=1)
RANK = 4


def randomize_bn_(model):
    """Non-trivial running statistics and affine parameters, so a wrong fold shows."""
    g = torch.Generator().manual_seed(1)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
    with torch.no_grad():
        for m in bns:
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.weight is not None:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
    return model


def low_rank_(model, rank):
    """Makes every ungrouped conv weight exactly rank `rank` as a (Cout, Cin*kh*kw) matrix (SVD there is exact)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.groups == 1:
                w = m.weight
                u = torch.randn(w.shape[0], rank, generator=g, dtype=torch.float64)
                v = torch.randn(rank, w[0].numel(), generator=g, dtype=torch.float64)
                low = (u @ v).reshape(w.shape)
                w.copy_((low * (w.double().norm() / low.norm())).to(w.dtype))
    return model


class Net(nn.Module):
    """One foldable pair of each kind, and pairs that must not fold."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 32, 3, padding=1)                 # -> bn_a: folds (conv has a bias)
        self.bn_a = nn.BatchNorm2d(32)
        self.conv_b = nn.Conv2d(32, 32, 3, padding=1, bias=False)    # -> bn_b: folds (bias created)
        self.bn_b = nn.BatchNorm2d(32, affine=False)
        self.conv_c = nn.Conv2d(32, 32, 3, padding=1)                # output also added to the residual: no
        self.bn_c = nn.BatchNorm2d(32)
        self.conv_d = nn.Conv2d(32, 32, 3, padding=1)                # relu between conv and bn: no
        self.bn_d = nn.BatchNorm2d(32)
        self.conv_e = nn.Conv2d(32, 32, 1)                           # bn without running stats: no
        self.bn_e = nn.BatchNorm2d(32, track_running_stats=False)
        self.conv_f = nn.Conv2d(32, 32, 3, padding=1)                # skipped by convert_: its bn stays
        self.bn_f = nn.BatchNorm2d(32)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.conv_a(x)))
        x = torch.relu(self.bn_b(self.conv_b(x)))
        c = self.conv_c(x)
        x = self.bn_c(c) + c
        x = self.bn_d(torch.relu(self.conv_d(x)))
        x = self.bn_e(self.conv_e(x))
        return self.bn_f(self.conv_f(x))


def test_pairs_found_on_the_traced_graph():
    assert conv_bn_pairs(Net()) == [("conv_a", "bn_a"), ("conv_b", "bn_b"), ("conv_f", "bn_f")]
    # A conv called twice computes two outputs; folding one BN into it would change the other.
    conv, bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    assert conv_bn_pairs(nn.Sequential(conv, bn, conv)) == []
    assert conv_bn_pairs(nn.Sequential(nn.Conv2d(8, 8, 1), bn, nn.Conv2d(8, 8, 1), bn)) == []


@pytest.mark.parametrize("bias", [True, False])
def test_fold_into_conv_is_exact(bias):
    conv = nn.Conv2d(6, 10, 3, padding=1, bias=bias).double()
    bn = randomize_bn_(nn.Sequential(nn.BatchNorm2d(10))).double().eval()[0]
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        y = bn(conv(x))
        fold_into_conv_(conv, bn)
        assert conv.bias is not None and conv.bias.dtype == torch.float64
        torch.testing.assert_close(conv(x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("only", [None, ["conv_b"]])
def test_fold_batch_norms_keeps_the_eval_model(only):
    # The whole-model fold (bench/models.py --fold-bn folds a dense model with it) and its conv filter.
    model = randomize_bn_(Net()).double().eval()
    original = copy.deepcopy(model)
    convs = None if only is None else {model.get_submodule(n) for n in only}
    pairs = fold_batch_norms_(model, convs=convs)
    assert pairs == ([("conv_a", "bn_a"), ("conv_b", "bn_b"), ("conv_f", "bn_f")] if only is None
                     else [("conv_b", "bn_b")])
    for conv_name, bn_name in pairs:
        assert isinstance(model.get_submodule(bn_name), FoldedBatchNorm)
        assert model.get_submodule(bn_name).into == conv_name
    assert isinstance(model.bn_c, nn.BatchNorm2d) and isinstance(model.bn_d, nn.BatchNorm2d)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def folded():
    torch.manual_seed(0)
    model = low_rank_(randomize_bn_(Net()), RANK).eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16)
    report = convert_(model, "svd", rank=RANK, min_params=100, skip=["conv_f"], example_input=x, fold_bn=True,
                      **FAST)
    return original, model, report, x


def test_convert_folds_then_factorizes(folded):
    original, model, report, x = folded
    assert [(r.name, r.folded_bn) for r in report.layers if r.folded_bn] == [("conv_a", "bn_a"), ("conv_b", "bn_b")]
    for name in ("bn_a", "bn_b"):
        assert isinstance(getattr(model, name), FoldedBatchNorm)
    for name in ("bn_c", "bn_d", "bn_e", "bn_f"):  # not exclusive, not direct, no stats, conv skipped
        assert type(getattr(model, name)) is nn.BatchNorm2d
    assert model.bn_a.into == "conv_a" and model.conv_b.bias is not None
    assert all(isinstance(getattr(model, "conv_" + c), FactorizedConv2d) for c in "abcde")
    # The folded weights are still exactly rank RANK, so the whole model computes the original function.
    assert max(r.rel_error for r in report.factorized) < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-4, atol=1e-4)
    assert report.model_output_error < 1e-5
    text = str(report)
    assert "+bn_a folded" in text and "batch norms folded into the conv before them: 2" in text
    back = type(report).from_json(report.to_json())
    assert back["conv_b"].folded_bn == "bn_b"


def test_folded_save_load_round_trip(folded, tmp_path):
    _, model, _, x = folded
    io.save(model, tmp_path / "m")
    plan = io.read_plan(tmp_path / "m")
    assert plan["format_version"] == 2
    assert plan["bn_folds"] == [{"bn": "bn_a", "conv": "conv_a"}, {"bn": "bn_b", "conv": "conv_b"}]
    loaded = io.load(tmp_path / "m", model=Net()).eval()
    assert isinstance(loaded.bn_b, FoldedBatchNorm) and loaded.bn_b.into == "conv_b"
    assert type(loaded.bn_c) is nn.BatchNorm2d
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # A model whose BN is not where the plan says cannot take the folded weights.
    other = Net()
    other.bn_a = nn.Identity()
    with pytest.raises(SaveFileError, match="folds 'bn_a' into 'conv_a'.*Identity"):
        io.load(tmp_path / "m", model=other)
    plan["bn_folds"] = [{"bn": "bn_a"}]
    (tmp_path / "m" / io.PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(SaveFileError, match="bn_folds must be"):
        io.load(tmp_path / "m", model=Net())


def test_unfolded_saves_stay_version_1(tmp_path):
    model = Net().eval()
    convert_(model, "svd", rank=RANK, min_params=100, **FAST)
    io.save(model, tmp_path / "m")
    plan = io.read_plan(tmp_path / "m")
    assert plan["format_version"] == 1 and "bn_folds" not in plan


def test_revert_keeps_the_folded_weights(folded):
    _, model, _, x = folded
    dense = copy.deepcopy(model)
    revert_(dense)
    assert isinstance(dense.conv_b, nn.Conv2d) and dense.conv_b.bias is not None
    assert isinstance(dense.bn_b, FoldedBatchNorm)  # BN is not un-folded
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), rtol=1e-5, atol=1e-5)


def test_failed_decomposition_keeps_the_folded_dense_conv_exact():
    model = low_rank_(randomize_bn_(Net()), RANK).eval()
    original = copy.deepcopy(model)
    x = torch.randn(1, 3, 12, 12)
    report = convert_(model, "svd", rank=RANK, min_params=100, overrides={"conv_b": {"rank": 10 ** 6}},
                      example_input=x, fold_bn=True, **FAST)
    assert "decomposition failed" in report["conv_b"].reason and report["conv_b"].folded_bn == "bn_b"
    assert type(model.conv_b) is nn.Conv2d and isinstance(model.bn_b, FoldedBatchNorm)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-4, atol=1e-4)


def test_fold_needs_eval_mode():
    with pytest.raises(ValueError, match=r"fold_bn=True needs the model in eval mode.*'bn_a'"):
        convert_(Net().train(), "svd", rank=4, min_params=100, fold_bn=True, **FAST)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x))


def test_untraceable_model_converts_without_folding():
    model = Untraceable().eval()
    with pytest.warns(UserWarning, match="torch.fx could not trace Untraceable.*no BatchNorm was folded"):
        report = convert_(model, "svd", rank=4, min_params=100, fold_bn=True, example_input=torch.randn(1, 3, 8, 8),
                          **FAST)
    assert type(model.bn) is nn.BatchNorm2d and isinstance(model.conv, FactorizedConv2d)
    assert report["conv"].folded_bn is None and "no BatchNorm was folded" in report.notes[0]
    assert "note: fold_bn: torch.fx could not trace" in str(report)
