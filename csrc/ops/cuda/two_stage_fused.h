// Fused CUDA forward of the kinds that are one kh x kw conv to a rank-r
// intermediate followed by a GEMM to the output channels,
//     y = bias + U @ conv(x, V),   V (r, Cin, kh, kw), U (Cout, r),
// in one kernel with the intermediate kept on chip:
//   svd                       V and U are the factors;
//   hsv level 1 with S1 = 1   V = B viewed as (P*T2, S2, kh, kw), U = A (T1, P)
//                             Kronecker I_T2 (T2 <= 4: the zeros cost T2x the
//                             GEMM's MACs, small next to the conv's).
// fp16/bf16 on tensor cores with fp32 accumulation; fp32 on tensor cores in
// TF32, so only where cuDNN may use TF32 too (torch.backends.cudnn.allow_tf32).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "../chain/conv_chain.h"
#include "epilogue_pass.h"

namespace hsv {
namespace cuda {

// The largest rank (intermediate channels) the two-stage kernels take.
int64_t two_stage_max_rank();

// Whether they take this dtype now: fp16, bf16, and fp32 (as TF32) only while
// torch.backends.cudnn.allow_tf32 lets cuDNN use TF32 too.
bool two_stage_dtype_supported(at::ScalarType dtype);

// Whether two_stage_forward runs these arguments on this device; if not and
// reason is given, it says why (kind layout, dtype, rank, compute capability, ...).
bool two_stage_supports(const at::Tensor& input, at::TensorList factors, const Plan& plan, const std::string& kind,
                        std::string* reason = nullptr);

// Whether HSV_CUDA_IMPL=auto runs the fused kernel without timing it (cudnn.benchmark
// off or a graph being captured); two_stage_supports must hold. True only where
// the H100 measurements had it faster than the composite chain (two_stage_fused.cu).
bool two_stage_fused_by_default(const at::Tensor& input, at::TensorList factors, const std::string& kind);

// plan must come from make_plan (arguments already validated) and
// two_stage_supports must hold. With a tail (conv2d_epilogue), relu?(y + residual):
// the channels_last kernels apply it as they store, the others after (epilogue_pass.h).
at::Tensor two_stage_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                             const Plan& plan, const std::string& kind, const Tail& tail = Tail());

}  // namespace cuda
}  // namespace hsv
