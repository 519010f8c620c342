// Fused CPU forward of kind "svd": y = U @ conv(x, V) + bias in one pass over
// the output, with the rank-r intermediate kept per tile in cache.
#pragma once

#include <ATen/ATen.h>

#include "../chain/conv_chain.h"
#include "ukernel.h"

namespace hsv {
namespace cpu {

// Whether svd_fused_forward handles these arguments (float32 only for now).
bool svd_fused_supports(const at::Tensor& input, const std::string& kind);

// plan must come from make_plan (arguments already validated).
at::Tensor svd_fused_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                             const Plan& plan, const Microkernel& uk);

}  // namespace cpu
}  // namespace hsv
