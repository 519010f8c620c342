import json
import subprocess
import sys


def test_info_json():
    out = subprocess.run([sys.executable, "-m", "hsvkernels", "info", "--json"], capture_output=True, text=True,
                         check=True)
    info = json.loads(out.stdout)
    assert info["extension"] is True
    assert "svd" in info["kinds"]
    assert info["cuda_kernels_can_run_here"] in (True, False)
    # what hsvkernels.export.to_onnx needs, as installed here (None where missing)
    from importlib.util import find_spec
    assert set(info["onnx_export_packages"]) == {"onnx", "onnxscript", "onnxruntime"}
    assert all((v is None) == (find_spec(k) is None) for k, v in info["onnx_export_packages"].items())


def test_info_text_and_bad_command():
    out = subprocess.run([sys.executable, "-m", "hsvkernels", "info"], capture_output=True, text=True, check=True)
    assert "torch_version" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "hsvkernels", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
