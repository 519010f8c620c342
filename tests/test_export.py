"""hsvkernels.export: converted models as graphs of standard ops (torch.export, ONNX in onnxruntime)."""
import importlib.util

import pytest
import torch
import torch.nn as nn
from factories import CASES, KINDS

import hsvkernels
from hsvkernels import export
from hsvkernels.__main__ import main

HAS_ONNX = not export.missing_packages("onnx", "onnxscript", "onnxruntime")
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="needs onnx, onnxscript and onnxruntime "
                                                      "(requirements-dev.txt installs them)")


def _layer(kind, seed=0):
    torch.manual_seed(seed)
    fact = CASES[kind].random((16, 8, 3, 3), dtype=torch.float32)
    return hsvkernels.FactorizedConv2d(fact, stride=2, padding=1, bias=torch.randn(16)).eval()


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 32, (3, 1), padding=(1, 0), dilation=(2, 1)), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2)
    return net


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("kind", KINDS)
def test_exported_program_has_only_standard_ops(kind, channels_last):
    layer = _layer(kind)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 11, 9).contiguous(memory_format=fmt)
    program = export.export(layer, (x,), dynamic_batch=True)
    assert export.hsv_ops_in(program) == []
    assert any("convolution" in str(n.target) or "conv2d" in str(n.target) for n in program.graph.nodes)
    run = program.module()
    for n in (3, 1, 0):   # other batch sizes than the traced one, 0 and 1 included
        xn = torch.randn(n, 8, 11, 9).contiguous(memory_format=fmt)
        with torch.no_grad():
            torch.testing.assert_close(run(xn), layer(xn), rtol=1e-5, atol=1e-5)


def test_static_batch_keeps_the_example_size():
    layer = _layer("svd")
    program = export.export(layer, (torch.randn(2, 8, 10, 10),))
    assert export.hsv_ops_in(program) == []
    assert not program.range_constraints   # no symbolic sizes
    with pytest.raises(Exception):
        program.module()(torch.randn(3, 8, 10, 10))


def test_batch_one_example_traces_a_free_batch():
    layer = _layer("hsv")
    program = export.export(layer, torch.randn(1, 8, 10, 10), dynamic_batch=True)
    x = torch.randn(5, 8, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-5, atol=1e-5)


def test_keyword_inputs_get_a_free_batch():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = _layer("tucker2")

        def forward(self, x, *, scale):
            return self.conv(x) * scale

    model = Two()
    program = export.export(model, (torch.randn(2, 8, 10, 10),), {"scale": torch.rand(2, 1, 1, 1)},
                            dynamic_batch=True)
    x, s = torch.randn(4, 8, 10, 10), torch.rand(4, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, scale=s), model(x, scale=s), rtol=1e-5, atol=1e-5)


def test_a_model_without_hsv_ops_exports_unchanged():
    net = _net()
    program = export.export(net, (torch.randn(2, 3, 16, 16),))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), net(x))


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        export.export(lambda x: x, (torch.randn(1),))
    with pytest.raises(TypeError, match="args must be a tensor or a tuple"):
        export.export(_layer("svd"), 3)
    with pytest.raises(ValueError, match="dynamic_batch needs a tensor input"):
        export.export(nn.Identity(), (3,), dynamic_batch=True)
    with pytest.raises(TypeError, match="ExportedProgram"):
        export.decompose_hsv_ops(_layer("svd"))


def test_missing_packages_are_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ImportError, match=r"onnxscript.*pip install onnxscript"):
        export.to_onnx(_layer("svd"), (torch.randn(2, 8, 6, 6),))


@needs_onnx
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_in_onnxruntime_matches_each_kind(kind, tmp_path):
    import onnx

    layer = _layer(kind, seed=1)
    path = tmp_path / ("%s.onnx" % kind)
    export.to_onnx(layer, (torch.randn(2, 8, 11, 9),), path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node), "only standard ONNX ops"
    err = export.compare_onnx(path, layer, (torch.randn(3, 8, 11, 9),))   # another batch than the traced one
    assert err["max_rel"] < 1e-5, err


@needs_onnx
def test_onnx_of_a_converted_network_is_smaller_and_matches(tmp_path):
    net = _net()
    x = torch.randn(1, 3, 16, 16)
    dense_path, path = tmp_path / "dense.onnx", tmp_path / "hsv.onnx"
    export.to_onnx(net, (x,), dense_path)
    hsvkernels.convert_(net, "hsv", ratio=4, example_input=x, progress=False, min_params=0)
    assert any(isinstance(m, hsvkernels.FactorizedConv2d) for m in net.modules())
    export.to_onnx(net, (x,), path)
    assert path.stat().st_size < dense_path.stat().st_size
    err = export.compare_onnx(path, net, (torch.randn(4, 3, 16, 16),))
    assert err["max_rel"] < 1e-5, err
    # a wrong input count is refused, not fed silently
    with pytest.raises(ValueError, match="takes 1 inputs"):
        export.compare_onnx(path, net, (x, x))
    with pytest.raises(ValueError, match="torch.bfloat16 tensors"):   # numpy has none: named, not a TypeError
        export.compare_onnx(path, net, (x.bfloat16(),))


@needs_onnx
def test_cli_compress_then_export_and_verify(tmp_path, capsys):
    pytest.importorskip("torchvision")
    d, onnx_path, pt2 = str(tmp_path / "m"), str(tmp_path / "m.onnx"), str(tmp_path / "m.pt2")
    assert main(["compress", "torchvision:resnet18", "--method", "svd", "--ratio", "4", "--input-size", "32",
                 "--out", d, "--json"]) == 0
    capsys.readouterr()
    # at 32 x 32 layer4's maps are 1 x 1, which bounds the sizes the program takes: said, not silent
    with pytest.warns(UserWarning, match=r"accepts only input 0 dim 2 in \[2, 32\]"):
        main(["export", d, "--pt2", pt2, "--input-size", "32", "--dynamic-size"])
    assert main(["export", d, "--onnx", onnx_path, "--pt2", pt2, "--input-size", "64", "--dynamic-size",
                 "--verify"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime vs torch at input 2x3x72x80" in out and "(ok, rtol" in out   # other sizes than traced
    program = torch.export.load(pt2)
    assert export.hsv_ops_in(program) == []
    model = hsvkernels.load(d).eval()
    x = torch.randn(3, 3, 72, 80)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(AssertionError, match="Guard failed"):   # layer4's maps would be 1 x 1: refused, not wrong
        program.module()(torch.randn(1, 3, 64, 24))


def test_cli_export_usage_errors(tmp_path, capsys):
    assert main(["export", "torchvision:resnet18"]) == 1
    assert "give --onnx FILE and/or --pt2 FILE" in capsys.readouterr().err
    assert main(["export", "torchvision:resnet18", "--pt2", str(tmp_path / "a.pt2"), "--verify"]) == 1
    assert "--verify checks the ONNX file" in capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
def test_dynamic_size_takes_other_images(kind):
    layer = _layer(kind)
    program = export.export(layer, (torch.randn(2, 8, 12, 10),), dynamic_batch=True, dynamic_size=True)
    assert export.hsv_ops_in(program) == []
    for shape in ((3, 8, 17, 9), (1, 8, 32, 40)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dynamic_size needs a 4-D"):
        export.export(nn.Linear(4, 4), (torch.randn(2, 4),), dynamic_size=True)


@needs_onnx
def test_onnx_with_dynamic_size(tmp_path, capsys):
    net = _net()
    hsvkernels.convert_(net, "hsv", ratio=4, example_input=torch.randn(1, 3, 16, 16), progress=False, min_params=0)
    path = tmp_path / "net.onnx"
    export.to_onnx(net, (torch.randn(1, 3, 16, 16),), path, dynamic_size=True)
    for shape in ((2, 3, 24, 20), (5, 3, 16, 16)):
        assert export.compare_onnx(path, net, (torch.randn(shape),))["max_rel"] < 1e-5


@needs_onnx
def test_compare_onnx_flattens_a_dict_output(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return {"a": self.a(x), "b": self.b(x)}
    torch.manual_seed(0)
    net, x = TwoHeads().eval(), torch.randn(1, 3, 8, 8)
    export.to_onnx(net, (x,), tmp_path / "two.onnx")
    assert export.compare_onnx(tmp_path / "two.onnx", net, (x,))["max_rel"] < 1e-5
    with torch.no_grad():   # the heads are compared, not their keys: a wrong head shows up
        net.b.weight.add_(1)
    assert export.compare_onnx(tmp_path / "two.onnx", net, (x,))["max_rel"] > 0.1
