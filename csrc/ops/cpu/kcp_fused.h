// Fused CPU forward of kind "kcp" (2nd-order Kronecker CP, 6 factors or the
// 5-factor merged form): the six stages of the chain run per band of output
// rows of one image, every intermediate in per-thread buffers, the output
// written once.
#pragma once

#include <ATen/core/Tensor.h>

#include "../chain/conv_chain.h"
#include "ukernel.h"

namespace hsv {
namespace cpu {

// Whether kcp_fused_forward handles these arguments (kind "kcp", float32 CPU).
bool kcp_fused_supports(const at::Tensor& input, const std::string& kind);

// plan must come from make_plan (arguments already validated).
at::Tensor kcp_fused_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                             const Plan& plan, const Microkernel& uk);

}  // namespace cpu
}  // namespace hsv
