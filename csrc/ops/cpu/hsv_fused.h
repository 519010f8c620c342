// Fused CPU forward of kinds "hsv" (levels 1 and 2) and "svd" (hsv with
// S1 = T2 = 1): every stage of the chain runs on one tile of output pixels
// while the tile's intermediates stay in cache, and the output tile is
// written once.
#pragma once

#include <ATen/core/Tensor.h>

#include "../chain/conv_chain.h"
#include "ukernel.h"

namespace hsv {
namespace cpu {

// Whether hsv_fused_forward handles these arguments (kinds "hsv" and "svd",
// float32 only for now).
bool hsv_fused_supports(const at::Tensor& input, const std::string& kind);

// hsv::conv2d_epilogue's tail (../epilogue.h): the general kernel applies it to
// each output tile right after writing it, while the tile is in cache; its
// other paths (pointwise_nchw, im2col_panels) to the whole output after.
struct Epilogue {
  const at::Tensor* residual = nullptr;  // checked against the output (check_residual), or null
  bool relu = false;
};

// plan must come from make_plan (arguments already validated).
at::Tensor hsv_fused_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                             const Plan& plan, const Microkernel& uk, const std::string& kind,
                             const Epilogue& epilogue = {});

// How many hsv_fused_forward calls ran their conv stage with several taps per
// microkernel call (MicrokernelTapsFn; HSV_CPU_CONV_TAPS=per_tap turns it off).
int64_t conv_tap_group_runs();

}  // namespace cpu
}  // namespace hsv
