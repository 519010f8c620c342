"""python -m hsvkernels demo --quick, in-process: the table, and the save/load round trip."""
import pytest

from hsvkernels.__main__ import main

pytest.importorskip("sklearn")


def test_demo_quick_prints_table_and_reloads_exactly(capsys, tmp_path):
    out = tmp_path / "saved"
    assert main(["demo", "--quick", "--methods", "svd,tucker2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    for column in ("params", "conv MACs", "acc before FT", "acc after FT", "latency/dense"):
        assert column in header
    rows = {line.split()[0]: line.split() for line in lines[lines.index(header) + 2:] if line.strip()}
    assert {"dense", "svd", "tucker2"} <= set(rows)
    dense_params = int(rows["dense"][2].replace(",", ""))
    for method in ("svd", "tucker2"):
        assert int(rows[method][2].replace(",", "")) < dense_params  # compression happened
        assert 0 <= float(rows[method][4]) <= 1 and 0 <= float(rows[method][5]) <= 1
    reload_line = next(line for line in lines if "reloaded with io.load" in line)
    assert float(reload_line.rsplit(" ", 1)[1]) <= 1e-6
    assert (out / "hsv_plan.json").exists()


def test_demo_rejects_unknown_method(capsys):
    assert main(["demo", "--quick", "--methods", "svd,nope"]) == 1
    assert "unknown method(s) nope" in capsys.readouterr().err


def test_demo_through_python_dash_m():
    # The real entry point: catches a handler defined after the module's __main__ guard.
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "hsvkernels", "demo", "--help"], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--ft-epochs" in proc.stdout and "--quick" in proc.stdout
