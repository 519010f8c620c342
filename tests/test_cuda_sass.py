"""The CUDA kernels' machine code, read from the built extension: no GPU needed.

The wgmma kernel (csrc/ops/cuda/two_stage_wgmma.cu) was written on a machine
without a GPU. What can be checked without one is checked here: that the build
holds its sm_90a code (setup.py builds 9.0 as 9.0a), that every instantiation
issues warpgroup MMAs (HGMMA in SASS) rather than falling back to a slower
instruction, and that none spills to local memory. Its numerics are tested on a
GPU (tests/test_cuda_fused.py -k wgmma).
"""
import os
import re
import shutil
import subprocess

import pytest

import hsvkernels
from hsvkernels import _extension

INFO = hsvkernels.build_info()


def find_cuobjdump():
    """cuobjdump from the CUDA toolkit, else the copy that ships with triton (a dependency of CUDA torch)."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "cuobjdump"), os.X_OK):
            return os.path.join(home, "bin", "cuobjdump")
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


CUOBJDUMP = find_cuobjdump()
pytestmark = [
    pytest.mark.skipif(not INFO.get("with_cuda"), reason="the native extension was built without CUDA kernels"),
]


def test_sm90a_flag_matches_the_arch_list():
    archs = INFO["cuda_archs"]
    if archs == "native":
        pytest.skip("built for the visible GPUs (TORCH_CUDA_ARCH_LIST unset): no list to check")
    parts = archs.split(";")
    assert INFO["cuda_sm90a"] == ("9.0a" in parts)
    if os.environ.get("HSV_NO_SM90A", "0") in ("0", ""):
        assert "9.0" not in parts, "setup.py should build 9.0 as 9.0a (the wgmma kernel's target)"


def sass_by_function(arch):
    """{mangled kernel name: its SASS} for one architecture's cubin in the extension."""
    out = subprocess.run([CUOBJDUMP, "-sass", "-arch", arch, _extension._C.__file__], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    functions, name = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            functions[name] = []
        elif name is not None:
            functions[name].append(line)
    return {k: "\n".join(v) for k, v in functions.items()}


@pytest.mark.skipif(CUOBJDUMP is None, reason="no cuobjdump (CUDA toolkit or triton) to read the cubin with")
def test_wgmma_kernels_issue_warpgroup_mmas_and_do_not_spill():
    if not INFO.get("cuda_sm90a"):
        pytest.skip("this build has no sm_90a code (cuda_archs=%r)" % INFO.get("cuda_archs"))
    sass = sass_by_function("sm_90a")
    kernels = {k: v for k, v in sass.items() if "wgmma_kernel" in k}
    # 2 dtypes x 4 padded ranks x 2 K steps x 1 or 2 warpgroups
    assert len(kernels) == 32, sorted(kernels)
    for name, code in kernels.items():
        assert "HGMMA" in code, "%s issues no warpgroup MMA" % name
        assert not re.search(r"\b(LDL|STL)\b", code), "%s uses local memory (spilled registers?)" % name
        # stage 2 takes the intermediate from registers: at least one HGMMA with a register A operand
        assert re.search(r"HGMMA\.64x64x16\.F32\S* R\d+, R\d+, gdesc", code), "%s: no register-A HGMMA" % name


@pytest.mark.skipif(CUOBJDUMP is None, reason="no cuobjdump (CUDA toolkit or triton) to read the cubin with")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_kcp_kernels_use_tensor_cores_and_do_not_spill(arch):
    # kcp_cuda.cu, opt-in and not yet run on a GPU: its numerics are checked by the CPU emulator of the same
    # CTA program (test_kcp_cta_emulate.py); here, that the kernel the GPU would run is the one intended
    if arch.replace("sm_", "").rstrip("a") not in [a.replace(".", "").rstrip("a")
                                                    for a in INFO["cuda_archs"].split(";")]:
        pytest.skip("this build has no %s code (cuda_archs=%r)" % (arch, INFO["cuda_archs"]))
    kernels = {k: v for k, v in sass_by_function(arch).items() if "kcp_kernel" in k}
    assert len(kernels) == 2, sorted(kernels)   # fp16 and bf16
    for name, code in kernels.items():
        assert "HMMA" in code, "%s issues no tensor-core MMA" % name
        assert not re.search(r"\b(LDL|STL)\b", code), "%s uses local memory (spilled registers?)" % name
