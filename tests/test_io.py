"""io.save / io.load: round trips, and clear errors for broken or mismatched save directories."""
import json
import os

import pytest
import torch
from torch import nn

from hsvkernels import METHODS, FactorizedConv2d, convert_, io, models
from hsvkernels.io import SaveFileError

torchvision = pytest.importorskip("torchvision")

FAST = dict(progress=False, decompose_threads=1)


def small_net(dtype=torch.float32):
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
    ).to(dtype)


@pytest.fixture
def saved_small(tmp_path):
    torch.manual_seed(0)
    model = small_net()
    report = convert_(model, "svd", ratio=2, min_params=100, **FAST)
    d = tmp_path / "small"
    io.save(model, d, report=report)
    return model, d


# mnasnet: its blocks check the state_dict version, which a safetensors file does not carry
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mnasnet0_5"])
def test_round_trip_torchvision(name, tmp_path):
    model = models.build("torchvision:" + name).eval()
    x = torch.randn(1, 3, 64, 64)
    report = convert_(model, "svd", ratio=3, example_input=x, min_params=2000, **FAST)
    io.save(model, tmp_path / name, report=report)
    plan = io.read_plan(tmp_path / name)
    assert plan["model"] == "torchvision:" + name and len(plan["layers"]) == len(report.factorized)
    assert plan["torch_version"] == torch.__version__ and plan["hsvkernels_version"]
    loaded = io.load(tmp_path / name).eval()  # architecture rebuilt from the plan's reference
    assert sum(isinstance(m, FactorizedConv2d) for m in loaded.modules()) == len(report.factorized)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert io.load_report(tmp_path / name).totals() == report.totals()


def test_cli_weights_from_safetensors_load_into_a_versioned_model(tmp_path):
    from safetensors.torch import save_file

    from hsvkernels.__main__ import _load_weights
    source = models.build("torchvision:mnasnet0_5")
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = models.build("torchvision:mnasnet0_5")
    _load_weights(model, str(tmp_path / "w.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_build_never_downloads_backbone_weights(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("models.build tried to download weights")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model = models.build("torchvision:lraspp_mobilenet_v3_large")  # its builder defaults to ImageNet backbone weights
    assert models.ref_of(model) == "torchvision:lraspp_mobilenet_v3_large"


def test_load_into_given_model_keeps_dtype_and_meta(tmp_path):
    torch.manual_seed(0)
    model = small_net(torch.float64)
    convert_(model, "svd", ratio=2, min_params=100, **FAST)
    io.save(model, tmp_path / "d")
    assert io.load_report(tmp_path / "d") is None
    loaded = io.load(tmp_path / "d", model=small_net())
    assert loaded[2].factors[0].dtype == torch.float64 and loaded[0].bias.dtype == torch.float64
    assert loaded[2].meta["rank"] == model[2].meta["rank"]
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_loaded_weights_are_aligned_and_own_their_memory(saved_small):
    # Tensors straight out of the safetensors file sit at its byte offsets (not 64-byte aligned), and BLAS
    # can round differently there: a loaded VGG-16 classifier differed by 1 ulp on an AVX2 EPYC. io.load
    # copies them into torch's own allocations.
    model, d = saved_small
    loaded = io.load(d, model=small_net())
    for name, t in loaded.state_dict().items():
        if t.numel():
            assert t.data_ptr() % 64 == 0, "%s at %d mod 64" % (name, t.data_ptr() % 64)


def test_shared_module_survives(tmp_path):
    conv = nn.Conv2d(16, 16, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    convert_(model, "svd", ratio=2, min_params=100, **FAST)
    assert model[0] is model[2] and isinstance(model[0], FactorizedConv2d)
    io.save(model, tmp_path / "d")
    conv2 = nn.Conv2d(16, 16, 3, padding=1)
    loaded = io.load(tmp_path / "d", model=nn.Sequential(conv2, nn.ReLU(), conv2))
    assert loaded[0] is loaded[2]
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_truncated_weights(saved_small):
    _, d = saved_small
    path = d / io.WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SaveFileError, match="checksum differs"):
        io.load(d, model=small_net())
    # Without the checksum, safetensors' own parser must still catch it.
    plan = json.loads((d / io.PLAN_FILE).read_text())
    del plan["weights_sha256"]
    (d / io.PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(SaveFileError, match="corrupt or truncated"):
        io.load(d, model=small_net())


def test_corrupt_or_missing_plan(saved_small, tmp_path):
    _, d = saved_small
    text = (d / io.PLAN_FILE).read_text()
    (d / io.PLAN_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(SaveFileError, match="not valid JSON"):
        io.load(d, model=small_net())
    (d / io.PLAN_FILE).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(SaveFileError, match="not an hsvkernels plan"):
        io.load(d, model=small_net())
    plan = json.loads(text)
    plan["format_version"] = 99
    (d / io.PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(SaveFileError, match="upgrade hsvkernels"):
        io.load(d, model=small_net())
    os.remove(d / io.PLAN_FILE)
    with pytest.raises(SaveFileError, match="not an hsvkernels save directory"):
        io.load(d, model=small_net())
    with pytest.raises(SaveFileError, match="not a directory"):
        io.load(tmp_path / "nowhere")


def test_wrong_architecture(saved_small):
    _, d = saved_small
    with pytest.raises(SaveFileError, match="no model reference"):
        io.load(d)
    with pytest.raises(SaveFileError, match="does not exist in"):
        io.load(d, model=nn.Sequential(nn.Conv2d(3, 32, 3, padding=1)))
    other = small_net()
    other[2] = nn.Conv2d(32, 64, 5, padding=2, bias=False)
    with pytest.raises(SaveFileError, match="kernel_size: plan"):
        io.load(d, model=other)
    bigger = nn.Sequential(*small_net(), nn.Conv2d(64, 8, 1))
    with pytest.raises(SaveFileError, match="missing from the file: 8.bias, 8.weight"):
        io.load(d, model=bigger)


def test_plan_factor_shapes_must_match_weights(saved_small):
    _, d = saved_small
    plan = json.loads((d / io.PLAN_FILE).read_text())
    v, u = plan["layers"][1]["factor_shapes"]
    plan["layers"][1]["factor_shapes"] = [[v[0] + 1] + v[1:], [u[0], u[1] + 1]]
    (d / io.PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(SaveFileError, match="shape mismatch: 2.factors.0"):
        io.load(d, model=small_net())
    plan["layers"][1]["kind"] = "no_such_kind"
    (d / io.PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(SaveFileError, match="cannot be rebuilt.*unknown kind"):
        io.load(d, model=small_net())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_converts_saves_and_loads(method, tmp_path):
    torch.manual_seed(0)
    model = small_net().eval()
    x = torch.randn(1, 3, 8, 8)
    report = convert_(model, method, ratio=2, min_params=100, example_input=x, **FAST)
    assert report.factorized, [(r.name, r.reason) for r in report.layers]
    io.save(model, tmp_path / method)
    loaded = io.load(tmp_path / method, model=small_net()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    kinds = [m.kind for m in model.modules() if isinstance(m, FactorizedConv2d)]
    assert [m.kind for m in loaded.modules() if isinstance(m, FactorizedConv2d)] == kinds
    assert len(kinds) == len(report.factorized)


@pytest.mark.parametrize("edit, message", [
    (("factor_shapes", [[-1, 3, 3, 3], [64, 16]]), "malformed: RuntimeError"),
    (("factor_shapes", "7x32"), "malformed: TypeError"),
    (("kernel_size", 3), "malformed: TypeError"),
    (("dtype", "int32"), "dtype 'int32'; expected a floating-point torch dtype name"),
    (("dtype", 5), "malformed: TypeError"),
], ids=["negative-shape", "shape-string", "kernel-int", "int-dtype", "dtype-number"])
def test_an_edited_plan_layer_gets_a_save_file_error(saved_small, edit, message):
    # An edited plan raised raw RuntimeError/TypeError from inside the rebuild, naming no layer
    _, d = saved_small
    plan = json.loads((d / io.PLAN_FILE).read_text())
    key, value = edit
    plan["layers"][0][key] = value
    (d / io.PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(SaveFileError, match=r"plan layer '\d+'.*" + message):
        io.load(d, model=small_net())
