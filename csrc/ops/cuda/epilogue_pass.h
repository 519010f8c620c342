// conv2d_epilogue's tail on the GPU: out = relu?(out + residual). The
// channels_last two-stage kernels apply it as they store each output chunk
// (two_stage_mma.cu, two_stage_wgmma.cu, two_stage_nhwc.cu); every other path
// runs epilogue_pass_ after the conv: one read of out and residual, one write,
// where ATen's add_ then relu_ make two passes. Off unless HSV_CUDA_EPILOGUE=on
// (conv2d_cuda.cu) until its tests have run on a GPU.
#pragma once

#include <ATen/core/Tensor.h>

namespace hsv {
namespace cuda {

struct Tail {
  const at::Tensor* residual = nullptr;  // the conv output's shape, dtype and device (checked), or null
  bool relu = false;

  bool any() const { return residual != nullptr || relu; }
  // Whether a channels_last kernel writing `out` (channels_last contiguous) can
  // read the residual beside its 16-byte stores: same strides, 16-byte aligned.
  bool fits_stores_of(const at::Tensor& out) const;
  // The residual's data for a kernel's params (fits_stores_of must hold), or null.
  const void* residual_data() const { return residual != nullptr ? residual->data_ptr() : nullptr; }
};

// Applies the tail to out in place on its device's current stream: one kernel
// for fp32/fp16/bf16 when out is dense and the residual lies the same way,
// ATen's add_ and relu_ otherwise. NaN stays NaN, as in torch.relu.
void epilogue_pass_(at::Tensor& out, const Tail& tail);

// Whether HSV_CUDA_EPILOGUE=on: conv2d_epilogue then runs the tail in the
// kernels and epilogue_pass_; off (the default), conv then add_ and relu_.
bool epilogue_from_env();

}  // namespace cuda
}  // namespace hsv
