"""hsvkernels._host_malloc: the benchmarks' switch that keeps freed host memory mapped."""
import subprocess
import sys
import textwrap

import pytest

from hsvkernels import _host_malloc

# Minor page faults taken by four more 64 MiB tensors, each filled and freed, after eight of them. The
# warm-up is what a timing loop's first calls are: with the heap retained, a posix_memalign of the same
# size may not fit the block just freed (its alignment slack went elsewhere) and be cut from fresh memory,
# one to three times in a row before the heap settles on reusing one or two blocks.
_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from hsvkernels import _host_malloc
    print(_host_malloc.configure(sys.argv[1]))
    n = 16 * 2 ** 20                      # floats: 64 MiB, above glibc's largest mmap threshold
    for _ in range(8):
        torch.empty(n).fill_(1.0)         # allocated, touched, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.empty(n).fill_(2.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split("\n")
    return out[0], int(out[1])


def test_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="host malloc mode must be one of .*'retain'.*got 'keep'"):
        _host_malloc.configure("keep")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt; other C libraries are left alone")
def test_retain_reuses_freed_memory_without_page_faults():
    said, faults = _faults("retain")
    if not said.startswith("retain"):
        pytest.skip("not glibc: %s" % said)
    assert "M_MMAP_MAX=0" in said
    # 64 MiB is 16384 pages of 4 KiB: with glibc's defaults each is faulted in again on every fill
    # (4 x 16384), retained none is (0 in 20 of 20 processes when this was written)
    said_default, faults_default = _faults("default")
    assert said_default.startswith("default")
    assert faults_default > 4 * 8000, faults_default
    assert faults < 200, faults
