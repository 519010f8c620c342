"""Smoke test of the benchmark scripts: they import, and layers.py produces a complete, sane result.

Tiny custom layers and a tiny timing budget keep it to a few seconds; the
numbers themselves mean nothing here.
"""
import json
import math
import os
import sys

import pytest

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
