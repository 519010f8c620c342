"""Loads the native extension hsvkernels._C, or records why it could not be loaded.

Loading _C registers the hsv ops with their C++ schemas and CPU/CUDA kernels.
Without it, hsvkernels.ops defines the same schemas in Python on top of the
pure-PyTorch reference path, so everything keeps working, only slower.
"""
import os
import warnings

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

try:
    if os.environ.get("HSV_NO_EXTENSION", "0") == "1":  # run everything on the reference path, e.g. in tests
        raise ImportError("HSV_NO_EXTENSION=1 is set")
    from . import _C  # noqa: F401  (registers torch.ops.hsv.*)

    LOAD_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = exc

HAS_EXTENSION = _C is not None

if not HAS_EXTENSION:
    warnings.warn(
        "hsvkernels: the native extension hsvkernels._C could not be loaded (%s); "
        "torch.ops.hsv.conv2d falls back to the pure-PyTorch reference path. "
        "Build it with `pip install --no-build-isolation -e .`." % (LOAD_ERROR,),
        RuntimeWarning,
        stacklevel=3,
    )


def build_info():
    """How the native extension was built, or why it is missing."""
    if _C is None:
        return {"extension": False, "load_error": str(LOAD_ERROR)}
    info = dict(_C.build_info())
    info["extension"] = True
    return info
