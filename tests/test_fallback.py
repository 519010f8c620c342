"""Without the native extension, importing hsvkernels warns once and the op runs on the reference path."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys, warnings
    sys.modules["hsvkernels._C"] = None          # makes `from . import _C` raise ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, torch.nn.functional as F
        import hsvkernels
    messages = [str(w.message) for w in caught if "native extension" in str(w.message)]
    assert len(messages) == 1, messages
    assert not hsvkernels.HAS_EXTENSION
    w = torch.randn(12, 6, 3, 3, dtype=torch.float64)
    fact = hsvkernels.decompose(w, "svd", rank=12)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64, requires_grad=True)
    y = hsvkernels.conv2d(x, fact, None, 2, 1)
    assert (y - F.conv2d(x, w, None, 2, 1)).abs().max() < 1e-12
    factors = [f.clone().requires_grad_() for f in fact.factors]
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    fn = lambda x, v, u, b: torch.ops.hsv.conv2d(x, [v, u], b, [2, 2], [1, 1], [1, 1], 1, "svd")
    assert torch.autograd.gradcheck(fn, (x, *factors, b))
    torch.library.opcheck(torch.ops.hsv.conv2d.default, (x.detach().float(), [f.detach().float() for f in factors],
                          None, [2, 2], [1, 1], [1, 1], 1, "svd"))
    print("fallback ok")
""")


def test_reference_fallback_without_extension():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout
