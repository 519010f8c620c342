// CUDA kernels of the hsv ops. For now the unfused ATen chain (cuDNN convs) on
// the current stream; the fused tensor-core kernels are selected here once they
// have been verified on a GPU.
#include <torch/library.h>

#include "../conv2d_composite.h"

TORCH_LIBRARY_IMPL(hsv, CUDA, m) {
  m.impl("conv2d", &hsv::conv2d_composite);
  m.impl("conv2d_backward", &hsv::conv2d_backward_composite);
}
