// CPU kernels of the hsv ops. For now the unfused ATen chain (oneDNN convs);
// fused AVX2/AVX-512 kernels are selected here once they exist.
#include <torch/library.h>

#include "../conv2d_composite.h"

TORCH_LIBRARY_IMPL(hsv, CPU, m) {
  m.impl("conv2d", &hsv::conv2d_composite);
  m.impl("conv2d_backward", &hsv::conv2d_backward_composite);
}
