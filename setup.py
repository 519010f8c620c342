"""Builds hsvkernels._C.

The C++ sources are always built. The CUDA sources (csrc/**/*.cu) are built when
torch is a CUDA build and nvcc is found, or when FORCE_CUDA=1 (for building on a
machine without a GPU). TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured; 9.0 in the list is built as 9.0a
(see _with_sm90a), unless HSV_NO_SM90A=1.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;9.0"


def _truthy(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _real_cuda_home():
    """The toolkit folder of the nvcc on PATH, asked of nvcc itself.

    torch derives CUDA_HOME from the location of `nvcc` on PATH, which is wrong
    when that nvcc is a wrapper script; nvcc's dry run prints its own TOP.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stderr + out.stdout, re.MULTILINE)
    return os.path.realpath(m.group(1).strip()) if m else None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported, so set it first.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    _home = _real_cuda_home()
    if _home:
        os.environ["CUDA_HOME"] = _home

import torch  # noqa: E402
from packaging.version import Version  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

MIN_TORCH = Version("2.4")


def _want_cuda():
    # USE_CUDA=0 (PyTorch's own spelling) builds the CPU kernels only: quicker while working on them.
    if os.environ.get("USE_CUDA", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if _truthy("FORCE_CUDA"):
        if CUDA_HOME is None:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the folder holding bin/nvcc")
        if torch.version.cuda is None:
            sys.exit("FORCE_CUDA=1 but torch %s is a CPU-only build" % torch.__version__)
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _with_sm90a(archs):
    """The arch list with 9.0 built as 9.0a, and whether it holds 9.0a.

    The wgmma kernel (csrc/ops/cuda/two_stage_wgmma.cu) needs the sm_90a target.
    9.0a code runs on the same chips as 9.0 (H100, H200), so 9.0 becomes 9.0a
    rather than being built twice: with both, which cubin the driver loads is
    not ours to choose. "9.0+PTX" is kept as it is (its PTX is for later chips).
    """
    parts = [a for a in re.split(r"[;\s]+", archs.strip()) if a]
    if not _truthy("HSV_NO_SM90A"):
        parts = ["9.0a" if a == "9.0" else a for a in parts]
    return ";".join(parts), "9.0a" in parts


def _extension():
    torch_version = Version(torch.__version__.split("+")[0])
    if torch_version < MIN_TORCH:
        sys.exit("hsvkernels needs torch >= %s, found %s" % (MIN_TORCH, torch.__version__))
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    # A .cu and a .cpp with the same stem compile to the same object file.
    stems = [os.path.splitext(os.path.basename(p))[0] for p in sources + cuda_sources]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        sys.exit("source files share a stem (same object file): %s" % ", ".join(clash))

    define_macros = [("HSV_TORCH_VERSION", '"%s"' % torch.__version__)]
    cxx_flags = ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    # Python's CFLAGS bring -g: debug info for the torch headers every file includes took 2.6x the
    # compile time (a bare #include <ATen/ATen.h>: 39 s against 15 s) and made most of CI's build.
    # Symbols stay either way, so perf and crash stacks still name functions. HSV_DEBUG_INFO=1 keeps -g.
    if not _truthy("HSV_DEBUG_INFO"):
        cxx_flags.append("-g0")
    link_flags = []
    # at::parallel_for (the fused CPU kernels' threads) is inline header code built on
    # "#pragma omp parallel" when torch uses OpenMP: without -fopenmp it silently runs on
    # one thread. torch is loaded first and already holds libgomp.so.1, so the extension
    # shares its OpenMP runtime.
    openmp = torch.backends.openmp.is_available() and sys.platform.startswith("linux")
    if openmp:
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if sys.platform.startswith("linux"):
        # Keep the symbols of any static archive the toolchain links in (some g++ builds
        # link libstdc++.a) local to the extension. Exported, they mixed with the shared
        # libstdc++ that torch loads: formatting an integer into an error message then
        # crashed (locale facet ids from one copy, facets from the other), so every
        # argument error became a segfault. No effect where libstdc++ is shared.
        link_flags.append("-Wl,--exclude-libs,ALL")
    with_cuda = _want_cuda()
    if with_cuda:
        # Without a GPU to ask, build for a list that covers A100 and H100.
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        archs, sm90a = "native", False  # unset on a GPU machine: torch builds for the GPUs it sees
        if os.environ.get("TORCH_CUDA_ARCH_LIST"):
            archs, sm90a = _with_sm90a(os.environ["TORCH_CUDA_ARCH_LIST"])
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        define_macros += [("WITH_CUDA", None), ("HSV_CUDA_VERSION", '"%s"' % torch.version.cuda),
                          ("HSV_CUDA_ARCHS", '"%s"' % archs)]
        if sm90a:
            define_macros.append(("HSV_SM90A", None))
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        if openmp:  # the same inline ATen code must not be compiled two ways in one library
            nvcc_flags += ["-Xcompiler", "-fopenmp"]
        return CUDAExtension("hsvkernels._C", sources + cuda_sources, define_macros=define_macros,
                             extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)
    return CppExtension("hsvkernels._C", sources, define_macros=define_macros, extra_compile_args={"cxx": cxx_flags},
                        extra_link_args=link_flags)


setup(
    packages=find_packages(include=["hsvkernels", "hsvkernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
