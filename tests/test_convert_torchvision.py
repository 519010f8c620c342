"""convert_ -> save -> load -> revert_ round trips on the torchvision CNNs the issue names.

Conv weights are first made exactly rank RANK (as (Cout, Cin*kh*kw) matrices), so
SVD at that rank reproduces them: the converted model must then compute the
original function, which checks the whole conversion (bias, stride, padding,
dilation, folded BN) and not just that something runs. ResNet-50 also folds its
batch norms. 64x64 inputs and SVD keep the module under half a minute on one core.
"""
import copy

import pytest
import torch
from torch import nn

from hsvkernels import FactorizedConv2d, convert_, io, models, revert_
from hsvkernels.fold import FoldedBatchNorm
from hsvkernels.report import DENSE, FACTORIZED

from test_fold import low_rank_, randomize_bn_

pytest.importorskip("torchvision")

RANK = 8
X = (1, 3, 64, 64)
# The two big ones carry the repo's slow marker (-m "not slow" leaves them out); ~45 s of the ~60 s here.
SLOW = pytest.mark.slow
NAMES = [pytest.param("resnet50", marks=SLOW), "mobilenet_v2", pytest.param("vgg16", marks=SLOW), "densenet121",
         "efficientnet_b0"]
FOLD = {"resnet50"}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.fixture(scope="module", params=NAMES)
def converted(request, tmp_path_factory):
    name = request.param
    torch.manual_seed(0)
    model = low_rank_(randomize_bn_(models.build("torchvision:" + name)), RANK).eval()
    original = copy.deepcopy(model)
    x = torch.randn(X)
    report = convert_(model, "svd", rank=RANK, example_input=x, fold_bn=name in FOLD, progress=False,
                      decompose_threads=1)
    with torch.no_grad():
        y, y0 = model(x), original(x)
    directory = tmp_path_factory.mktemp(name)
    io.save(model, directory, report=report)
    return name, original, model, report, x, y, y0, directory


def test_every_conv_is_factorized_or_says_why(converted):
    name, original, model, report, *_ = converted
    assert len(report.layers) == len(convs(original))
    assert report.factorized, name
    for r in report.layers:
        assert r.decision == FACTORIZED or (r.decision == DENSE and r.reason), (r.name, r.reason)
        if r.groups > 1:
            assert r.decision == DENSE and "grouped" in r.reason
    assert sum(isinstance(m, FactorizedConv2d) for m in model.modules()) == len(report.factorized)
    assert len(convs(model)) == len(report.dense)
    assert report.totals()["params_after"] < report.totals()["params_before"]


def test_outputs_match_the_dense_model(converted):
    name, _, _, report, _, y, y0, _ = converted
    assert torch.isfinite(y).all() and y.shape == y0.shape
    assert rel(y, y0) < 1e-4, name
    assert report.model_output_error < 1e-4


def test_batch_norms_folded_or_kept(converted):
    name, original, model, report, *_ = converted
    if name not in FOLD:
        assert not any(r.folded_bn for r in report.layers)
        assert not any(isinstance(m, FoldedBatchNorm) for m in model.modules())
        return
    # Every BN of ResNet-50 directly follows a conv of its own (downsample ones included).
    bns = [n for n, m in original.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(r.folded_bn for r in report.layers if r.folded_bn) == sorted(bns)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FoldedBatchNorm) for m in model.modules()) == len(bns) == 53


def test_save_load_into_fresh_instance(converted):
    name, _, model, report, x, y, _, directory = converted
    plan = io.read_plan(directory)
    assert plan["model"] == "torchvision:" + name and len(plan["layers"]) == len(report.factorized)
    loaded = io.load(directory, model=models.build("torchvision:" + name)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    assert io.load_report(directory).totals() == report.totals()


def test_revert_gives_dense_convs_computing_the_same(converted):
    _, original, model, _, x, y, _, _ = converted
    dense = copy.deepcopy(model)
    revert_(dense)
    assert not any(isinstance(m, FactorizedConv2d) for m in dense.modules())
    assert len(convs(dense)) == len(convs(original))
    with torch.no_grad():
        assert rel(dense(x), y) < 1e-5
