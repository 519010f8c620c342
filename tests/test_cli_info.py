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


def test_info_text_and_bad_command():
    out = subprocess.run([sys.executable, "-m", "hsvkernels", "info"], capture_output=True, text=True, check=True)
    assert "torch_version" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "hsvkernels", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
