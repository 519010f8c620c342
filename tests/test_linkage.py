"""How the native extension is linked.

Some g++ toolchains link libstdc++ statically (the H100 machine's /opt/gcc did).
With that copy's symbols exported, the extension's streams mixed with the shared
libstdc++ that torch loads, and formatting an integer into any error message
segfaulted (CPU and CUDA alike). setup.py links with --exclude-libs,ALL; this
checks the outcome: no standard library internals among the exported symbols.
"""
import shutil
import subprocess
import sys

import pytest

from hsvkernels import _extension

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF dynamic symbols: Linux only"),
    pytest.mark.skipif(_extension._C is None, reason="the native extension is not built"),
    pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed"),
]

# Mangled-name pieces that only libstdc++'s own objects define: locale facets
# (codecvt), ostream/istream members, the locale class itself.
LIBSTDCXX_ONLY = ("codecvt", "_ZNSo", "_ZNSi", "_ZNSt6locale")


def test_extension_exports_no_libstdcxx_internals():
    out = subprocess.run(["nm", "-D", "--defined-only", _extension._C.__file__], capture_output=True, text=True,
                         check=True).stdout
    leaked = [line.split()[-1] for line in out.splitlines() if any(s in line for s in LIBSTDCXX_ONLY)]
    assert not leaked, "the extension exports %d libstdc++ symbols, e.g. %s" % (len(leaked), leaked[:5])


def test_error_message_with_integers_is_raised_not_crashed():
    # the exact call that segfaulted on the mixed-libstdc++ build: a message with
    # integers in it; run in a child so a crash fails this test instead of pytest
    code = ("import torch, hsvkernels\n"
            "try:\n"
            "    torch.ops.hsv.conv2d(torch.randn(1, 5, 5, 5), [torch.randn(4, 4, 3, 3), torch.randn(6, 4)], None,"
            " [1, 1], [0, 0], [1, 1], 1, 'svd')\n"
            "except ValueError as e:\n"
            "    print('raised:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, "child exited with %d: %s" % (res.returncode, res.stderr[-2000:])
    assert "raised: hsv::conv2d(kind='svd'): input has 5 channels but factors[0] (V) expects Cin = 4" in res.stdout
