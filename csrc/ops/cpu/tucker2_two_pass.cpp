// Kind "tucker2", factors [U_S (R_S, Cin), core (R_T, R_S, kh, kw), U_T (Cout, R_T)]:
//   pass 1  the first 1x1 (Cin -> R_S) over the whole input as one oneDNN 1x1 conv
//           (a GEMM; its R_S-channel output is a fraction of the input's size);
//   pass 2  the kh x kw core conv and the last 1x1 in the fused kernel of kind "svd"
//           (hsv_fused.cpp) with V = core and U = U_T: the R_T-channel intermediate
//           stays in cache per pixel tile and the output is written once.
// The composite chain makes three passes and writes both intermediates. Zero
// padding commutes with the bias-free 1x1 before it, so pass 2 pads pass 1's
// output exactly as the chain's middle stage does. (One pass would compute the
// 1x1 per tile on the tile's input halo, recomputing the halo rows.)
#include "tucker2_two_pass.h"

#include <ATen/ops/conv2d.h>

#include "hsv_fused.h"

namespace hsv {
namespace cpu {

bool tucker2_two_pass_supports(const at::Tensor& input, const std::string& kind) {
  return kind == "tucker2" && input.scalar_type() == at::kFloat && input.device().is_cpu();
}

at::Tensor tucker2_two_pass_forward(const at::Tensor& input, at::TensorList factors,
                                    const c10::optional<at::Tensor>& bias, const Plan& plan, const Microkernel& uk) {
  TORCH_CHECK(plan.stages.size() == 3, "hsv::conv2d(kind='tucker2'): expected a three-stage plan");
  const at::Tensor& us = factors[0];  // make_plan checked: every factor float32 like the input
  // The op's output layout follows the input's; pass 2's follows its own input, so
  // pass 1's output is put in the input's (a no-op unless oneDNN chose otherwise).
  const at::MemoryFormat fmt = output_memory_format(input);
  const at::Tensor mid = at::conv2d(input, us.view({us.size(0), us.size(1), 1, 1})).contiguous(fmt);
  const ConvParams& cv = plan.stages[1].conv;
  const std::vector<at::Tensor> rest{factors[1], factors[2]};
  const Plan second = make_plan(mid, rest, bias, cv.stride, cv.padding, cv.dilation, 1, "svd");
  return hsv_fused_forward(mid, rest, bias, second, uk, "svd").contiguous(fmt);
}

}  // namespace cpu
}  // namespace hsv
