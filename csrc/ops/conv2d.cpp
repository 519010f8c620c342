// Schemas of the hsv ops. Kernels live in ops/cpu and ops/cuda; fake kernels,
// autograd and FLOP formulas are registered from Python (hsvkernels/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(hsv, m) {
  m.def(
      "conv2d(Tensor input, Tensor[] factors, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, str kind) -> Tensor");
  // Gradients of conv2d; output_mask = [input, factors, bias]. Entries not asked for come back undefined.
  m.def(
      "conv2d_backward(Tensor grad_output, Tensor input, Tensor[] factors, bool has_bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, str kind, bool[3] output_mask) -> (Tensor, Tensor[], Tensor)");
  // conv2d followed by `+ residual` (when given, the conv output's shape) and a ReLU (when relu): the tail of
  // most ResNet convs in one op, so it runs on the output while it is in cache (epilogue.h).
  m.def(
      "conv2d_epilogue(Tensor input, Tensor[] factors, Tensor? bias, Tensor? residual, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, str kind, bool relu) -> Tensor");
}
