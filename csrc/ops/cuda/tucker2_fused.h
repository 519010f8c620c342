// Fused CUDA forward of kind "tucker2" (factors [U_S (R_S, Cin), core (R_T, R_S,
// kh, kw), U_T (Cout, R_T)]): the 1x1 conv Cin -> R_S, the kh x kw conv
// R_S -> R_T and the 1x1 conv R_T -> Cout in one kernel, both intermediates kept
// in shared memory. fp16/bf16 on tensor cores with fp32 accumulation; fp32 in
// TF32, only where cuDNN may use TF32 too (torch.backends.cudnn.allow_tf32).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "../chain/conv_chain.h"

namespace hsv {
namespace cuda {

// Whether tucker2_forward runs these arguments on this device; if not and
// reason is given, it says why (dtype, ranks, shared memory, ...).
bool tucker2_supports(const at::Tensor& input, at::TensorList factors, const Plan& plan, const std::string& kind,
                      std::string* reason = nullptr);

// plan must come from make_plan (arguments already validated) and
// tucker2_supports must hold.
at::Tensor tucker2_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                           const Plan& plan);

}  // namespace cuda
}  // namespace hsv
