// Kind "tucker2" on the fused CPU path, in two passes over memory instead of the
// composite chain's three (see tucker2_two_pass.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "../chain/conv_chain.h"
#include "ukernel.h"

namespace hsv {
namespace cpu {

// Whether tucker2_two_pass_forward handles these arguments (kind "tucker2", float32).
bool tucker2_two_pass_supports(const at::Tensor& input, const std::string& kind);

// plan must come from make_plan for kind "tucker2" (arguments already validated).
at::Tensor tucker2_two_pass_forward(const at::Tensor& input, at::TensorList factors,
                                    const c10::optional<at::Tensor>& bias, const Plan& plan, const Microkernel& uk);

}  // namespace cpu
}  // namespace hsv
