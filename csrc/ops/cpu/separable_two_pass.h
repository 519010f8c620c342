// Kinds "ht2" and "tt_tucker" on the fused CPU path, in three passes over memory
// instead of the composite chain's four (see separable_two_pass.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "../chain/conv_chain.h"
#include "ukernel.h"

namespace hsv {
namespace cpu {

// Whether separable_two_pass_forward handles these arguments (kind "ht2" or "tt_tucker", float32).
bool separable_two_pass_supports(const at::Tensor& input, const std::string& kind);

// plan must come from make_plan for the same kind (arguments already validated).
at::Tensor separable_two_pass_forward(const at::Tensor& input, at::TensorList factors,
                                      const c10::optional<at::Tensor>& bias, const Plan& plan, const Microkernel& uk);

}  // namespace cpu
}  // namespace hsv
