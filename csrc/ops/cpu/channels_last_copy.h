// NCHW -> NHWC copies for the fused CPU kernels, with the ISA's register
// transpose (Microkernel::to_pixel_major) instead of ATen's strided copy.
#pragma once

#include <ATen/core/Tensor.h>

#include "ukernel.h"

namespace hsv {
namespace cpu {

// x (N, C, H, W) as a channels_last tensor of the same values. Inputs whose
// planes are contiguous (stride(3) == 1, stride(2) == W; any batch and channel
// strides) go through uk.to_pixel_major in chunks of pixels over the threads;
// others through ATen's copy. x must be a 4-D CPU tensor (ValueError otherwise).
at::Tensor to_channels_last(const at::Tensor& x, const Microkernel& uk);

// to_channels_last with the microkernel that HSV_CPU_ISA selects (the tests' probe).
at::Tensor to_channels_last_selected(const at::Tensor& x);

}  // namespace cpu
}  // namespace hsv
