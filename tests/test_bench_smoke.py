"""Smoke test of the benchmark scripts: they import, and layers.py produces a complete, sane result.

Tiny custom layers and a tiny timing budget keep it to a few seconds; the
numbers themselves mean nothing here.
"""
import json
import math
import os
import sys

import pytest
import torch

import hsvkernels

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import layers, suite  # noqa: E402

TINY = ["--shape", "8,16,3,3,1,1,1,10,10", "--shape", "16,8,1,1,2,0,1,9,9"]
# --host-malloc default: "retain" would change malloc for the whole test process (test_host_malloc.py covers it)
FAST = ["--batch", "1,2", "--min-run-time", "0.002", "--rounds", "1", "--min-blocks", "2", "--threads", "1",
        "--host-malloc", "default"]


def test_suite_is_deduplicated_and_tagged():
    shapes = suite.shapes()
    keys = [(s.cin, s.cout, s.kh, s.kw, s.stride, s.padding, s.dilation, s.groups, s.h, s.w) for s in shapes]
    assert len(keys) == len(set(keys))
    assert sum(len(s.uses) for s in shapes) == len(suite.CONV_CALLS)
    assert {t for s in shapes for t in s.tags} == set(suite.DOC_TAGS)
    (l3,) = suite.select(tags=["L3"])
    assert (l3.cin, l3.cout, l3.kh, l3.h, l3.out_hw) == (256, 256, 3, 14, (14, 14))
    assert set(l3.models) == {"resnet18", "resnet50"}
    deep = suite.select(models=["resnet18"], channels_min=128)
    assert deep and all(min(s.cin, s.cout) >= 128 and "resnet18" in s.models for s in deep)


def _refuser(weight, *, rank=None, ratio=None):
    raise ValueError("refuses everything")


def test_layers_main_writes_sane_json(tmp_path, monkeypatch, capsys):
    # a method that refuses, next to the real ones, exercises the "refused" path
    monkeypatch.setitem(hsvkernels.METHODS, "refuser", _refuser)
    out = tmp_path / "smoke"
    result = layers.main(TINY + FAST + ["--out", str(out)])
    printed = capsys.readouterr().out
    assert "threads: 1" in printed and "precision:" in printed

    data = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.md").read_text().startswith("# hsvkernels layer benchmark")
    assert data["schema"] == result["schema"]
    for key in ("torch", "cpu_model", "threads", "hsvkernels_build", "mkldnn_available", "precision", "hostname",
                "date_utc", "command"):
        assert key in data["env"]
    assert data["env"]["host_malloc"].startswith("default") and "host malloc: default" in printed
    methods = sorted(hsvkernels.METHODS)
    assert len(data["rows"]) == 2 * 2 * len(methods)   # layers x batches x methods

    refused = [r for r in data["rows"] if r["method"] == "refuser"]
    assert refused and all(r["status"] == "refused" and "refuses everything" in r["message"] for r in refused)

    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["method"] for r in ok} >= {"svd"}
    for r in ok:
        for key in ("ratio_op_dense", "ratio_ref_dense", "ratio_op_ref", "params_ratio", "macs_ratio",
                    "gflops_dense", "gflops_op", "gflops_ref"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        for path in ("dense", "op", "reference"):
            t = r["time"][path]
            assert t["blocks"] >= 2 and t["runs"] >= t["blocks"] and 0 < t["median"] < 1 and t["iqr"] >= 0
        assert r["check"]["op"] <= r["check"]["tolerance"]
    assert data["summary"] and all(s["geomean_op_dense"] > 0 for s in data["summary"])


def test_layers_fails_loudly_on_wrong_output(tmp_path, monkeypatch):
    real = hsvkernels.reference.conv2d
    monkeypatch.setattr(hsvkernels.reference, "conv2d", lambda *a, **k: real(*a, **k) * 1.01)
    with pytest.raises(RuntimeError, match="WRONG OUTPUT"):
        layers.main(TINY[:2] + FAST + ["--methods", "svd", "--out", str(tmp_path / "wrong")])


@pytest.mark.skipif(not hsvkernels.build_info().get("extension"), reason="needs the native extension")
def test_layers_fused_columns(tmp_path):
    # --fused: a fourth timed path with its ratios and the measured peak behind %peak
    out = tmp_path / "fused"
    result = layers.main(TINY + FAST + ["--fused", "--methods", "hsv,svd", "--peak-seconds", "0.02",
                                        "--out", str(out)])
    assert result["settings"]["peak_gflops"] > 0
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    assert {r["method"] for r in ok} == {"hsv", "svd"}
    for r in ok:
        assert r["time"]["fused"]["median"] > 0 and r["check"]["fused"] <= r["check"]["tolerance"]
        assert r["ratio_fused_dense"] > 0 and r["ratio_fused_op"] > 0 and 0 < r["peak_share_fused"]
        # the composite's share of peak bounds what fused/op can reach: the same MACs, so the two ratios agree
        assert r["peak_share_op"] == pytest.approx(r["peak_share_fused"] * r["ratio_fused_op"], rel=1e-9)
    md = (tmp_path / "fused.md").read_text()
    assert "fused/dense" in md and "%peak fused" in md and "%peak op" in md and "Dense F.conv2d backend(s)" in md


def test_layers_roofline(tmp_path):
    # --roofline on (automatic on CUDA): every timed path against the measured ceilings; tiny ceilings to be fast
    from bench import ceilings
    out = tmp_path / "roof"
    os.environ.pop("HSV_CPU_IMPL", None)
    result = layers.main(TINY[:2] + FAST + ["--methods", "svd", "--impls", "composite", "--roofline", "on",
                                            "--ceiling-seconds", "0.02", "--out", str(out)])
    ceil = result["settings"]["ceilings"]
    assert ceil["tflops"] > 0 and ceil["gbps"] > 0 and ceil["device"] == "cpu"
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    assert ok
    for r in ok:
        assert set(r["roofline"]) == {"dense", "op", "reference", "impl:composite"}
        x_elems = r["batch"] * r["cin"] * r["h"] * r["w"]
        y_elems = r["batch"] * r["cout"] * r["ho"] * r["wo"]
        assert r["bytes_dense"] == 4 * (x_elems + y_elems + r["params_dense"])
        assert r["bytes_fact"] == 4 * (x_elems + y_elems + r["params_fact"])
        for path, roof in r["roofline"].items():
            t = r["time"][path]["median"] if not path.startswith("impl:") else r["time_impls"]["composite"]["median"]
            macs, nbytes = (r["macs_dense"], r["bytes_dense"]) if path == "dense" else (r["macs_fact"], r["bytes_fact"])
            assert roof["tflops"] == pytest.approx(2 * macs / t / 1e12, rel=1e-9)
            assert roof["gbps"] == pytest.approx(nbytes / t / 1e9, rel=1e-9)
            assert roof["bound_s"] == pytest.approx(max(2 * macs / (ceil["tflops"] * 1e12),
                                                        nbytes / (ceil["gbps"] * 1e9)), rel=1e-9)
            assert roof["roofline_share"] == pytest.approx(roof["bound_s"] / t, rel=1e-9)
    assert r["gflops_dense"] == pytest.approx(1e3 * r["roofline"]["dense"]["tflops"], rel=1e-9)
    md = (tmp_path / "roof.md").read_text()
    assert "Roofline: measured ceilings on cpu" in md and "| impl:composite |" in md
    assert ceilings.roofline(2e12, 1e9, 2.0, {"tflops": 1.0, "gbps": 1.0})["roofline_share"] == pytest.approx(1.0)


def test_models_conv_tflops_and_latency_budget(tmp_path):
    # end to end: the convs' achieved TFLOP/s next to the matmul ceiling (on CPU only with --roofline on), with
    # the layers chosen under a measured latency budget (ranks.select(latency_ratio=...))
    pytest.importorskip("torchvision")
    from bench import models
    out = tmp_path / "models"
    assert models.main(["--models", "resnet18", "--methods", "svd", "--batch", "1", "--input-size", "32",
                        "--min-run-time", "0.02", "--threads", "1", "--cpu-impl", "composite", "--roofline", "on",
                        "--ratio", "2", "--latency-ratio", "1.2", "--latency-points", "2", "--grad-mode", "no_grad",
                        "--host-malloc", "default", "--out", str(out)]) == 0
    data = json.loads((tmp_path / "models.json").read_text())
    (row,) = data["rows"]
    assert row["options"] == {"latency_ratio": 1.2, "ratio": 2.0} and row["plan_latency_x"] >= 1.2
    assert row["grad_mode"] == "no_grad"
    assert row["model_params_x"] > 1.5   # the whole model's parameters; the budget is over the convs
    assert data["ceilings"]["tflops"] > 0 and row["matmul_ceiling_tflops"] == data["ceilings"]["tflops"]
    assert row["conv_tflops_compressed"] > 0 and row["factorized"] > 0
    # the same conv work per second, scaled by the MACs each model does
    assert row["conv_tflops_dense"] / row["conv_tflops_compressed"] == pytest.approx(
        row["conv_macs_x"] * row["compressed_s"] / row["dense_s"], rel=1e-9)
    md = (tmp_path / "models.md").read_text()
    assert "measured ceilings on cpu" in md and "conv TFLOP/s compressed" in md and "under torch.no_grad" in md


def test_models_fuse_epilogues_rows(tmp_path):
    pytest.importorskip("torchvision")
    from bench import models
    assert models.main(["--models", "resnet18", "--methods", "svd", "--batch", "1", "--input-size", "32",
                        "--min-run-time", "0.02", "--threads", "1", "--cpu-impl", "fused,composite", "--fold-bn",
                        "--fuse-epilogues", "--host-malloc", "default", "--out", str(tmp_path / "m")]) == 0
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["fused", "composite", "fused+epilogues", "composite+epilogues"]
    assert all(r["compressed_s"] > 0 and r["factorized"] > 0 for r in rows)
    assert all(r["epilogues_h2h"]["ratio"] > 0 for r in rows[2:]) and "epilogues_h2h" not in rows[0]
    assert "Epilogue fusion head to head" in (tmp_path / "m.md").read_text()


def test_models_compile_and_aoti_rows(tmp_path):
    # both models through torch.compile and as AOTInductor packages, checked against their eager outputs,
    # then timed
    pytest.importorskip("torchvision")
    from bench import models
    assert models.main(["--models", "resnet18", "--methods", "svd", "--batch", "1", "--input-size", "32",
                        "--min-run-time", "0.02", "--threads", "1", "--cpu-impl", "fused", "--compile", "--aoti",
                        "--host-malloc", "default", "--out", str(tmp_path / "m")]) == 0
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [(r["impl"], r["compiled"]) for r in rows] == [("fused", None), ("fused+compile", "compile"),
                                                          ("fused+aoti", "aoti")]
    assert all(r["compressed_s"] > 0 and r["dense_s"] > 0 for r in rows)
    for row, kind in ((rows[1], "compile"), (rows[2], "aoti")):
        h2h = row[kind + "_h2h"]
        assert set(h2h) == {"dense", "compressed"} and min(h2h.values()) > 0
    md = (tmp_path / "m.md").read_text()
    assert "Rows IMPL+compile" in md and "torch.compile head to head" in md
    assert "Rows IMPL+aoti" in md and "AOTInductor head to head" in md
    for flag in ("--compile", "--aoti"):
        with pytest.raises(SystemExit, match="--compile/--aoti and --graph"):
            models.main(["--graph", flag])


def test_models_check_compiled_catches_a_wrong_graph():
    from bench import models
    x = torch.randn(2, 3)
    good, bad = torch.nn.Identity(), torch.nn.Identity()
    models.check_compiled([good], [torch.nn.Identity()], x, "inference_mode")
    with pytest.raises(SystemExit, match="off from the eager"):
        models.check_compiled([lambda t: t + 1], [bad], x, "inference_mode")


def test_fuse_or_exit_names_the_model_fx_cannot_trace():
    from bench.models import fuse_or_exit

    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(SystemExit, match="--fuse-epilogues on branchy: torch.fx could not trace Branchy"):
        fuse_or_exit(Branchy(), "branchy")


@pytest.mark.skipif(not hsvkernels.export.missing_packages("onnx", "onnxscript", "onnxruntime") == [],
                    reason="needs onnx, onnxscript and onnxruntime (requirements-dev.txt installs them)")
def test_onnx_runtime_model_and_layers(tmp_path):
    pytest.importorskip("torchvision")
    from bench import onnx_runtime
    common = ["--models", "resnet18", "--methods", "svd", "--batch", "2", "--input-size", "32", "--min-run-time",
              "0.01", "--threads", "1", "--host-malloc", "default"]
    assert onnx_runtime.main(common + ["--fold-bn", "--fuse-epilogues", "--out", str(tmp_path / "model")]) == 0
    (row,) = json.loads((tmp_path / "model.json").read_text())["rows"]
    assert row["bn_folded"] == 20 and row["onnx_bytes_compressed"] < row["onnx_bytes_dense"]
    assert row["onnx_max_rel_diff"] < 1e-4 and row["conv_macs_x"] > 1
    for k in ("ort_dense", "ort_compressed", "torch_dense", "torch_compressed", "torch_compressed_epilogues"):
        assert row["times"][k]["median"] > 0
    assert row["ort_ratio"] == pytest.approx(row["times"]["ort_compressed"]["median"]
                                             / row["times"]["ort_dense"]["median"])
    assert row["ort_vs_torch_compressed_epilogues"] == pytest.approx(
        row["times"]["ort_compressed"]["median"] / row["times"]["torch_compressed_epilogues"]["median"])
    assert "ORT compressed / torch compressed + epilogues" in (tmp_path / "model.md").read_text()
    with pytest.raises(SystemExit, match="--fuse-epilogues is for whole models"):
        onnx_runtime.main(common + ["--layers", "--fuse-epilogues"])
    layers = ["--layers", "--layer-filter", "layer2.*", "--out", str(tmp_path / "layers")]
    assert onnx_runtime.main(common + layers) == 0
    rows = json.loads((tmp_path / "layers.json").read_text())["rows"]
    # one row per distinct layer config: layer2.1's two convs repeat layer2.0.conv2
    assert [r["layer"] for r in rows] == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    assert all(r["batch"] == 2 and r["gflops_compressed"]["torch_compressed"] > 0 for r in rows)
    assert "| resnet18 | layer2.0.conv1 |" in (tmp_path / "layers.md").read_text()


def test_onnx_runtime_check_same_catches_a_wrong_model():
    from bench import onnx_runtime
    x = torch.randn(2, 3)
    onnx_runtime.check_same(torch.nn.Identity(), torch.nn.Identity(), x, "same")
    with pytest.raises(SystemExit, match="wrong differs from the model"):
        onnx_runtime.check_same(torch.nn.Identity(), lambda t: t * 1.01, x, "wrong")


def test_cpu_few_channels(tmp_path):
    # every path is checked against dense before it is timed; the rows carry the ratios the table prints
    from bench import cpu_few_channels
    out = tmp_path / "few"
    assert cpu_few_channels.main(["--threads", "1", "--batch", "1", "--input-size", "40", "--min-run-time", "0.01",
                                  "--host-malloc", "default", "--out", str(out)]) == 0
    rows = json.loads((tmp_path / "few.json").read_text())["rows"]
    assert [r["rank"] for r in rows] == [11, 4]
    for r in rows:
        assert all(t > 0 for t in r["ms"].values())
        assert r["panels_over_general"] == pytest.approx(r["ms"]["panels"] / r["ms"]["general"])
    assert "| resnet conv1 (7x7/2) | 3 | 64 | 40 |" in (tmp_path / "few.md").read_text()


def test_models_impl_entries_set_extra_variables():
    # --cpu-impl fused+HSV_CPU_IM2COL_PANELS=off: a second fused row with another setting, in the same process
    from bench import models
    allowed = ("composite", "fused", "auto")
    assert models.impl_settings("HSV_CPU_IMPL", "fused", allowed) == {"HSV_CPU_IMPL": "fused"}
    assert models.impl_settings("HSV_CPU_IMPL", "fused+HSV_CPU_IM2COL_PANELS=off+HSV_CPU_ISA=avx2", allowed) == {
        "HSV_CPU_IMPL": "fused", "HSV_CPU_IM2COL_PANELS": "off", "HSV_CPU_ISA": "avx2"}
    for bad, msg in (("fastest", "must be one of"), ("fused+PATH=/x", "expected \\+HSV_NAME=VALUE"),
                     ("fused+HSV_CPU_ISA", "expected \\+HSV_NAME=VALUE"), ("fused+HSV_CPU_ISA=", "expected")):
        with pytest.raises(SystemExit, match=msg):
            models.impl_settings("HSV_CPU_IMPL", bad, allowed)


def test_cpu_fused_hsv_ab_column(tmp_path, monkeypatch):
    # --ab VAR=VALUE: a fused path with that setting, interleaved; the setting is not left behind
    from bench import cpu_fused_hsv
    monkeypatch.delenv("HSV_CPU_CONV_TAPS", raising=False)
    out = tmp_path / "hsv"
    assert cpu_fused_hsv.main(["--threads", "1", "--reps", "1", "--batch", "1", "--layouts", "nhwc", "--layers",
                               "128@28", "--peak-seconds", "0.05", "--host-malloc", "default",
                               "--ab", "HSV_CPU_CONV_TAPS=per_tap", "--out", str(out)]) == 0
    assert "HSV_CPU_CONV_TAPS" not in os.environ
    text = (tmp_path / "hsv.md").read_text()
    assert "| ab ms | f/ab |" in text and "ab: the fused kernel with HSV_CPU_CONV_TAPS=per_tap" in text
    row = [line for line in text.splitlines() if line.startswith("| 128@28 3x3 |")]
    assert len(row) == 1 and len(row[0].strip("|").split("|")) == 15
    with pytest.raises(SystemExit):
        cpu_fused_hsv.main(["--ab", "HSV_CPU_CONV_TAPS"])


def test_env_set_sets_unsets_and_restores(monkeypatch):
    from bench import timing
    monkeypatch.setenv("HSV_TEST_A", "outer")
    monkeypatch.delenv("HSV_TEST_B", raising=False)
    with timing.env_set({"HSV_TEST_A": None, "HSV_TEST_B": "inner"}):
        assert "HSV_TEST_A" not in os.environ and os.environ["HSV_TEST_B"] == "inner"
    assert os.environ["HSV_TEST_A"] == "outer" and "HSV_TEST_B" not in os.environ


def test_results_index_is_current_and_check_catches_a_new_file(tmp_path, monkeypatch, capsys):
    from bench import results_index
    assert results_index.main(["--check"]) == 0, capsys.readouterr().err
    (tmp_path / "a.md").write_text("# A run\n\n    command: python bench/models.py --x\n    host: vm  "
                                   "date: 2026-11-25T01:00:00+00:00  git: 0123456789abcdef\n")
    monkeypatch.setattr(results_index, "RESULTS", tmp_path)
    monkeypatch.setattr(results_index, "INDEX", tmp_path / "INDEX.md")
    assert results_index.main(["--check"]) == 1
    assert "missing ['a.md']" in capsys.readouterr().err
    assert results_index.main([]) == 0 and results_index.main(["--check"]) == 0
    row = [line for line in (tmp_path / "INDEX.md").read_text().splitlines() if line.startswith("| [a.md]")]
    assert row == ["| [a.md](a.md) | 2026-11-25 | 0123456 | A run | `bench/models.py --x` |"]
    (tmp_path / "a.md").unlink()
    assert results_index.main(["--check"]) == 1
    assert "gone ['a.md']" in capsys.readouterr().err
