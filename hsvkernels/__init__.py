"""hsvkernels: fine-grained low-rank factorized convolutions for PyTorch.

    fact = hsvkernels.decompose(conv.weight, "svd", ratio=4)
    y = hsvkernels.conv2d(x, fact, conv.bias, stride=1, padding=1)
    layer = hsvkernels.FactorizedConv2d.from_conv(conv, method="svd", ratio=4)
"""
from . import _extension
from . import ops as _ops  # registers fake kernels, autograd and FLOP formulas
from . import reference
from ._extension import HAS_EXTENSION, build_info
from .decompose import METHODS, decompose
from .factorization import Factorization
from .formats import FORMATS
from .nn import FactorizedConv2d
from .ops import conv2d
from .convert import convert_, revert_
from .report import Report
from .io import load, save
from .epilogue import fuse_epilogues
from . import export   # export.export / export.to_onnx: graphs of standard ops for other runtimes
# The function shadows its submodule as an attribute; `from hsvkernels.finetune import accuracy` still works.
from .finetune import finetune

__version__ = "0.1.0"

__all__ = ["FORMATS", "METHODS", "HAS_EXTENSION", "Factorization", "FactorizedConv2d", "Report", "build_info", "conv2d",
           "convert_", "decompose", "export", "fuse_epilogues", "revert_", "reference", "__version__", "finetune",
           "load", "save"]
