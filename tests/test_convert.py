"""convert_ / revert_ on whole models, and the Report they produce."""
import copy
import json
import math

import pytest
import torch
from torch import nn

import hsvkernels
from hsvkernels import FactorizedConv2d, convert_, revert_
from hsvkernels.report import DENSE, FACTORIZED, Report

torchvision = pytest.importorskip("torchvision")

X64 = (1, 3, 64, 64)
FAST = dict(progress=False, decompose_threads=1)  # single-threaded SVD: much faster on shared cores


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
    )


def convs(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def resnet18_converted():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    original = copy.deepcopy(model)
    x = torch.randn(X64)
    report = convert_(model, "svd", ratio=4, example_input=x, **FAST)
    return original, model, report, x


def test_resnet18_all_convs_factorized(resnet18_converted):
    original, model, report, x = resnet18_converted
    assert len(report.layers) == len(convs(original)) == 20
    assert convs(model) == []  # every nn.Conv2d was replaced
    assert all(r.decision == FACTORIZED and r.method == "svd" for r in report.layers)
    for r in report.layers:
        assert r.params_after < r.params_before and r.macs_after < r.macs_before
        assert 0 <= r.rel_error < 1 and r.output_error is not None and r.meta["rank"] >= 1
    with torch.no_grad():
        y, y0 = model(x), original(x)
    assert y.shape == y0.shape
    assert report.model_output_error == pytest.approx(rel(y.double(), y0.double()), rel=1e-6)


def test_report_totals_match_layers(resnet18_converted):
    original, model, report, _ = resnet18_converted
    t = report.totals()
    assert t["params_before"] == sum(r.params_before for r in report.layers)
    assert t["params_after"] == sum(r.params_after for r in report.layers)
    assert t["macs_before"] == sum(r.macs_before for r in report.layers)
    assert t["macs_after"] == sum(r.macs_after for r in report.layers)
    assert t["model_params_before"] == sum(p.numel() for p in original.parameters())
    assert t["model_params_after"] == sum(p.numel() for p in model.parameters())
    # Only conv parameters changed.
    assert t["model_params_before"] - t["model_params_after"] == t["params_before"] - t["params_after"]
    # Dense MACs of conv1 (64x3x7x7, stride 2 -> 32x32 output at 64x64 input).
    assert report["conv1"].macs_before == 64 * 3 * 49 * 32 * 32
    assert report.input_size == X64


def test_report_outputs(resnet18_converted, tmp_path):
    _, _, report, _ = resnet18_converted
    text = str(report)
    assert "layer4.1.conv2" in text and "TOTAL (20/20 factorized)" in text and "FLOPs = 2 x MACs" in text
    md = report.to_markdown()
    assert md.splitlines()[0].startswith("| layer |") and len(md.splitlines()) == 2 + 20 + 1
    back = Report.from_json(report.to_json())
    assert back.totals() == report.totals() and back.layers[3] == report.layers[3]
    assert json.loads(report.to_json())["totals"]["factorized"] == 20
    report.to_json(tmp_path / "r.json")
    assert Report.from_json(tmp_path / "r.json").totals() == report.totals()
    png = report.plot(tmp_path / "r.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_revert_round_trip(resnet18_converted):
    _, model, _, x = resnet18_converted
    dense = copy.deepcopy(model)
    names = revert_(dense)
    assert len(names) == 20 and len(convs(dense)) == 20
    assert not any(isinstance(m, FactorizedConv2d) for m in dense.modules())
    with torch.no_grad():
        assert rel(dense(x), model(x)) < 1e-5


def test_mobilenet_v2_grouped_convs_stay_dense():
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    x = torch.randn(X64)
    with torch.no_grad():
        y0 = model(x)
    report = convert_(model, "svd", ratio=2, example_input=x, min_params=20000, **FAST)
    grouped = [r for r in report.layers if r.groups > 1]
    assert grouped and all(r.decision == DENSE and "grouped" in r.reason for r in grouped)
    small = [r for r in report.layers if r.groups == 1 and math.prod(r.shape) < 20000]
    assert small and all(r.decision == DENSE and "min_params" in r.reason for r in small)
    assert report.factorized and all(r.groups == 1 for r in report.factorized)
    assert sum(isinstance(m, FactorizedConv2d) for m in model.modules()) == len(report.factorized)
    assert all(r.params_after == r.params_before for r in report.dense)
    with torch.no_grad():
        assert model(x).shape == y0.shape
    revert_(model)
    assert len(convs(model)) == len(report.layers)


def test_overrides_skip_and_filter():
    model = small_net()
    report = convert_(model, "svd", ratio=2, min_params=100, example_input=torch.randn(1, 3, 16, 16),
                      skip=("0",), overrides={"2": {"rank": 5}, "7": None}, **FAST)
    assert "skip pattern '0'" in report["0"].reason and report["0"].decision == DENSE
    assert report["2"].decision == FACTORIZED and report["2"].meta["rank"] == 5
    assert "override '7' is None" in report["7"].reason
    assert "grouped" in report["5"].reason
    assert isinstance(model[2], FactorizedConv2d) and isinstance(model[7], nn.Conv2d)

    model = small_net()
    report = convert_(model, "svd", ratio=2, min_params=100, filter_fn=lambda m, name: m.stride == (1, 1), **FAST)
    assert report["7"].reason == "excluded by filter_fn" and report["2"].decision == FACTORIZED


def test_unprofitable_and_failing_layers_stay_dense():
    model = small_net()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        y0 = model(x)
    # rank 27 on 32x3x3x3: 27*27 + 32*27 params > 32*27 dense -> no saving; rank 1000 is out of range.
    report = convert_(model, "svd", rank=27, min_params=100, overrides={"7": {"rank": 1000}}, example_input=x,
                      **FAST)
    assert report["0"].decision == DENSE and report["0"].reason.startswith("no saving")
    assert report["0"].params_after == report["0"].params_before
    assert report["7"].decision == DENSE and "decomposition failed" in report["7"].reason
    assert report["2"].decision == FACTORIZED
    with torch.no_grad():
        assert model(x).shape == y0.shape


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="not a known method"):
        convert_(small_net(), "nope", ratio=2, **FAST)
    with pytest.raises(ValueError, match="no layer could be decomposed"):
        convert_(small_net(), "svd", ratio=2, min_params=100, no_such_option=1, **FAST)
    with pytest.raises(TypeError, match="overrides"):
        convert_(small_net(), "svd", ratio=2, overrides={"0": 3}, **FAST)


def test_measure_and_modes_preserved():
    model = small_net().train()
    bn = model[3]
    stats = bn.running_mean.clone()
    report = convert_(model, "svd", ratio=2, min_params=100, example_input=torch.randn(2, 3, 16, 16), measure=True,
                      **FAST)
    assert torch.equal(bn.running_mean, stats)  # the sizing pass must not update batch-norm statistics
    assert all(m.training for m in model.modules())
    tried = [r for r in report.layers if r.method is not None]
    assert tried and all(r.latency_dense_ms > 0 and r.latency_factorized_ms > 0 for r in tried)
    for r in tried:
        if r.decision == DENSE:
            assert r.reason.startswith("slower than dense")


def test_default_example_input_gives_macs_without_output_error():
    model = small_net()
    report = convert_(model, "svd", ratio=2, min_params=100, **FAST)
    assert report.input_size == (1, 3, 224, 224)
    assert report["2"].macs_before == 64 * 32 * 9 * 224 * 224
    assert report["2"].output_error is None and report.model_output_error is None


def test_public_api():
    assert hsvkernels.convert_ is convert_ and hsvkernels.revert_ is revert_ and hsvkernels.Report is Report


def test_layer_that_fails_to_run_stays_dense(monkeypatch):
    def broken(self, input):
        raise RuntimeError("kind not built into the extension")
    monkeypatch.setattr(FactorizedConv2d, "forward", broken)
    model = small_net()
    report = convert_(model, "svd", ratio=2, min_params=100, example_input=torch.randn(1, 3, 8, 8), **FAST)
    tried = [r for r in report.layers if r.method is not None]
    assert tried and all(r.decision == DENSE and "failed to run" in r.reason for r in tried)
    assert not any(isinstance(m, FactorizedConv2d) for m in model.modules())


def test_measure_keeps_a_slower_layer_dense(monkeypatch):
    # Deterministic timings: factorized 32->64 conv "2" is slower than dense, conv "7" faster.
    import hsvkernels._timing

    def fake_latency_ms(module, x):
        if isinstance(module, FactorizedConv2d):
            return 3.0 if module.in_channels == 32 else 0.5
        return 1.0
    monkeypatch.setattr(hsvkernels._timing, "latency_ms", fake_latency_ms)
    model = small_net().eval()
    report = convert_(model, "svd", ratio=2, min_params=100, example_input=torch.randn(1, 3, 16, 16), measure=True,
                      **FAST)
    slow, fast = report["2"], report["7"]
    assert slow.decision == DENSE and slow.reason == "slower than dense: 3.000 ms vs 1.000 ms"
    assert (slow.latency_dense_ms, slow.latency_factorized_ms) == (1.0, 3.0)
    assert slow.params_after == slow.params_before and slow.macs_after == slow.macs_before
    assert type(model[2]) is nn.Conv2d
    assert fast.decision == FACTORIZED and (fast.latency_dense_ms, fast.latency_factorized_ms) == (1.0, 0.5)
    assert isinstance(model[7], FactorizedConv2d)
    assert "slower than dense: 3.000 ms vs 1.000 ms" in str(report) and "0.500" in str(report)


def nested_net():
    from collections import OrderedDict
    block = lambda: nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    return nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 32, 3, padding=1), stage1=block(), stage2=block(),
                                     stage3=block()))


def test_overrides_by_name_pattern_first_match_wins():
    model = nested_net()
    overrides = {"stage1.*": {"rank": 6}, "stage2.0": None, "stage2.2": {"method": "tucker2", "ratio": 2},
                 "stage*": {"rank": 7}}
    stem_rank = hsvkernels.decompose(model.stem.weight, "svd", ratio=4).meta["rank"]
    report = convert_(model, "svd", ratio=4, min_params=100, overrides=overrides, **FAST)
    assert [report[n].meta["rank"] for n in ("stage1.0", "stage1.2")] == [6, 6]
    assert report["stage2.0"].decision == DENSE and "override 'stage2.0' is None" in report["stage2.0"].reason
    assert report["stage2.2"].method == "tucker2" and model.stage2[2].kind == "tucker2"
    assert model.stage1[0].meta["rank"] == 6 and model.stage1[0].kind == "svd"
    assert [report[n].meta["rank"] for n in ("stage3.0", "stage3.2")] == [7, 7]
    # The stem matches no pattern: the global ratio applies.
    assert report["stem"].method == "svd" and report["stem"].meta["rank"] == stem_rank not in (6, 7)


def test_report_table_shows_split_and_ranks():
    model = nested_net()
    report = convert_(model, "svd", ratio=2, min_params=100,
                      overrides={"stage1.0": {"method": "hsv"}, "stage1.2": {"method": "tucker2"}}, **FAST)
    text = str(report)
    assert "split/ranks" in text.splitlines()[0]
    hsv = report["stage1.0"].meta
    assert "split=%s,rank=%d" % ("x".join(map(str, hsv["split"])), hsv["rank"]) in text
    tk = report["stage1.2"].meta
    assert "R_T=%d,R_S=%d" % (tk["R_T"], tk["R_S"]) in text
    assert "| %d |" % report["stem"].meta["rank"] in report.to_markdown()


def test_budget_allocates_a_model_wide_target():
    torch.manual_seed(0)
    model = nested_net()
    x = torch.randn(1, 3, 16, 16)
    report = convert_(model, "svd", budget=3, min_params=100, example_input=x, **FAST)
    assert report.options["budget"] == {"ratio": 3}
    t = report.totals()
    assert t["compression"] >= 3 * 0.98  # the plan meets it on weights; biases add a little
    for r in report.layers:
        assert r.decision == FACTORIZED or r.reason == "kept dense by the budget allocation"
    assert len(report.factorized) >= 2
    # Both targets: MACs are bounded too.
    model = nested_net()
    report = convert_(model, "svd", budget={"ratio": 2, "macs_ratio": 3}, min_params=100, example_input=x, **FAST)
    assert report.totals()["macs_reduction"] >= 3 * 0.98 and report.totals()["compression"] >= 2 * 0.98


def test_ranks_plan_from_ranks_select_is_followed():
    from hsvkernels import ranks
    model = nested_net()
    x = torch.randn(1, 3, 16, 16)
    plan = ranks.select(model, "tucker2", ratio=3, example_input=x, progress=False)
    del plan["stage3.2"]
    stem_override = {"stem": {"method": "svd", "rank": 2}}
    report = convert_(model, "svd", ranks=plan, min_params=100, example_input=x, overrides=stem_override, **FAST)
    assert report["stage3.2"].reason == "not in the ranks plan" and type(model.stage3[2]) is nn.Conv2d
    for name, choice in plan.items():
        if name == "stem":
            assert report[name].method == "svd" and report[name].meta["rank"] == 2  # the override wins
        elif choice.method == "dense":
            assert report[name].reason == "kept dense by the ranks plan"
        else:
            r = report[name]
            assert r.method == choice.method and (r.meta["R_T"], r.meta["R_S"]) == tuple(choice.config["rank"])
    assert sum(r.method == "tucker2" for r in report.factorized) >= 3


def test_budget_argument_errors():
    with pytest.raises(ValueError, match="budget= or ranks=, not both"):
        convert_(small_net(), "svd", budget=2, ranks={}, **FAST)
    with pytest.raises(ValueError, match="do not also give ratio"):
        convert_(small_net(), "svd", budget=2, ratio=2, **FAST)
    with pytest.raises(ValueError, match="budget must be a number"):
        convert_(small_net(), "svd", budget={"params": 2}, **FAST)
    with pytest.raises(ValueError, match="latency_ratio=.*convert_\\(model, ranks=plan\\)"):
        convert_(small_net(), "svd", budget={"latency_ratio": 2}, **FAST)
    with pytest.raises(TypeError, match="ranks must be a hsvkernels.ranks.Plan"):
        convert_(small_net(), "svd", ranks=[3], **FAST)
    with pytest.raises(ValueError, match=r"budget\['ratio'\] is a parameter compression .* got 0.5"):
        convert_(small_net(), "svd", budget=0.5, min_params=100, **FAST)
    with pytest.raises(ValueError, match=r"budget\['macs_ratio'\] is a MAC reduction .* got 'x'"):
        convert_(small_net(), "svd", budget={"macs_ratio": "x"}, min_params=100, **FAST)
    with pytest.raises(ValueError, match="offers no candidates"):
        convert_(small_net(), "cp", budget=2, min_params=100, **FAST)
    from hsvkernels import ranks
    plan = ranks.select([(torch.randn(64, 32, 3, 3), (8, 8))], "svd", ratio=2, progress=False)
    with pytest.raises(ValueError, match="names none of this model's convs"):
        convert_(nested_net(), "svd", ranks=plan, **FAST)  # plan layers are "0", the net's "stem", ...


def test_calibration_batch_separate_from_sizes():
    torch.manual_seed(0)
    model = small_net().eval()
    original = copy.deepcopy(model)
    sizes, calib = torch.randn(1, 3, 32, 32), torch.randn(4, 3, 8, 8)
    report = convert_(model, "svd", ratio=2, min_params=100, example_input=sizes, calibration=calib, **FAST)
    assert report.input_size == (1, 3, 32, 32) and report["2"].macs_before == 64 * 32 * 9 * 32 * 32
    # Errors are measured on the calibration batch, not on the sizing input.
    with torch.no_grad():
        expected = rel(model(calib).double(), original(calib).double())
        y2 = original[1](original[0](calib))
        layer_err = rel(model[2](y2).double(), original[2](y2).double())
    assert report.model_output_error == pytest.approx(expected, rel=1e-6)
    assert report["2"].output_error == pytest.approx(layer_err, rel=1e-6)
    # calibration alone also gives the sizes.
    report = convert_(small_net().eval(), "svd", ratio=2, min_params=100, calibration=calib, **FAST)
    assert report.input_size == (4, 3, 8, 8) and report["2"].output_error is not None
    with pytest.raises(ValueError, match="forward pass on calibration of shape"):
        convert_(small_net(), "svd", ratio=2, calibration=torch.randn(1, 5, 8, 8), **FAST)


def test_default_method_is_hsv():
    model = small_net()
    report = convert_(model, ratio=2, min_params=100, **FAST)
    assert report.method == "hsv" and {r.method for r in report.factorized} == {"hsv"}


def test_top_level_save_load_finetune():
    from hsvkernels import io
    from hsvkernels.finetune import accuracy  # the submodule stays importable though the function shadows it
    assert hsvkernels.save is io.save and hsvkernels.load is io.load
    assert hsvkernels.finetune.__name__ == "finetune" and hsvkernels.finetune.__module__ == "hsvkernels.finetune"
    assert accuracy.__module__ == "hsvkernels.finetune"


class TwoHeads(nn.Module):
    """Returns a dict, as torchvision's segmentation models do."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.head = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        f = self.body(x)
        return {"out": self.head(f), "aux": (f.mean((2, 3)), "a label")}


def test_model_output_error_of_a_dict_output():
    torch.manual_seed(0)
    model = TwoHeads().eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12)
    report = convert_(model, "svd", ratio=4, example_input=x, min_params=0, **FAST)
    assert report.factorized
    with torch.no_grad():
        y, y0 = model(x), original(x)
    a = torch.cat([y["out"].flatten(), y["aux"][0].flatten()]).double()
    b = torch.cat([y0["out"].flatten(), y0["aux"][0].flatten()]).double()
    assert report.model_output_error == pytest.approx(rel(a, b), rel=1e-6) and report.model_output_error > 0


def test_cli_verify_compares_dict_outputs_and_refuses_incomparable_ones():
    import io as _io

    from hsvkernels.__main__ import _verify
    torch.manual_seed(0)
    model = TwoHeads().eval()
    original = copy.deepcopy(model)
    x = torch.randn(1, 3, 10, 10)
    convert_(model, "svd", ratio=4, example_input=x, min_params=0, **FAST)
    out = _io.StringIO()
    assert _verify(model, original, x, out) == 0, out.getvalue()
    assert "verify: OK" in out.getvalue() and "relative output error 0." in out.getvalue()

    class Words(nn.Module):
        def forward(self, x):
            return ["no tensor here"]
    out = _io.StringIO()
    assert _verify(Words(), Words(), x, out) == 1
    assert "FAILED: the outputs (list) hold no tensors of matching shapes" in out.getvalue()


def test_bad_argument_types_are_named():
    net = small_net()
    for kwargs, error, message in (
            (dict(skip=5), TypeError, "skip must be a name pattern or a list of them"),
            (dict(skip=[5]), TypeError, "skip must be a name pattern"),
            (dict(skip=None), TypeError, "skip must be a name pattern"),
            (dict(overrides=["0"]), TypeError, "overrides must be a dict"),
            (dict(overrides={0: None}), TypeError, "overrides keys must be layer-name patterns"),
            (dict(filter_fn=5), TypeError, "filter_fn must be callable"),
            (dict(min_params="10"), ValueError, "min_params must be an int >= 0"),
            (dict(example_input="abc"), TypeError, "example_input must be the model's input tensor"),
            (dict(decompose_threads=0), ValueError, "decompose_threads must be None or an int >= 1")):
        with pytest.raises(error, match=message):
            convert_(net, "svd", ratio=2, progress=False, **kwargs)
    assert not any(isinstance(m, FactorizedConv2d) for m in net.modules())   # refused before anything changed
