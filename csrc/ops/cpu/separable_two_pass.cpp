// Kinds "ht2" and "tt_tucker", factors [U1 (R1, Cin), G1 (R13, R1, kh),
// G2 (R3, R13, kw), U3 (Cout, R3)] (kind_ht2.cpp):
//   pass 1  the first 1x1 (Cin -> R1) and the kh x 1 conv (R1 -> R13) as two
//           oneDNN convs (their outputs are rank-sized, a fraction of the input's);
//   pass 2  the 1 x kw conv and the last 1x1 in the fused kernel of kind "svd"
//           (hsv_fused.cpp) with V = G2 and U = U3: the R3-channel intermediate
//           stays in cache per pixel tile and the output is written once.
// The composite chain writes and reads back all three intermediates. The same
// split as tucker2_two_pass.cpp; each conv pads exactly as the chain's stage does.
#include "separable_two_pass.h"

#include <ATen/ops/conv2d.h>

#include "hsv_fused.h"

namespace hsv {
namespace cpu {

bool separable_two_pass_supports(const at::Tensor& input, const std::string& kind) {
  return (kind == "ht2" || kind == "tt_tucker") && input.scalar_type() == at::kFloat && input.device().is_cpu();
}

at::Tensor separable_two_pass_forward(const at::Tensor& input, at::TensorList factors,
                                      const c10::optional<at::Tensor>& bias, const Plan& plan, const Microkernel& uk) {
  TORCH_CHECK(plan.stages.size() == 4, "hsv::conv2d(kind ht2/tt_tucker): expected a four-stage plan");
  const at::Tensor &u1 = factors[0], &g1 = factors[1], &g2 = factors[2], &u3 = factors[3];
  // The op's output layout follows the input's; pass 2's follows its own input,
  // so pass 1's output is put in the input's.
  const at::MemoryFormat fmt = output_memory_format(input);
  const ConvParams& vertical = plan.stages[1].conv;
  const at::Tensor z1 = at::conv2d(input, u1.reshape({u1.size(0), u1.size(1), 1, 1}));
  const at::Tensor mid = at::conv2d(z1, g1.reshape({g1.size(0), g1.size(1), g1.size(2), 1}), {},
                                    vertical.stride, vertical.padding, vertical.dilation)
                             .contiguous(fmt);
  const ConvParams& horizontal = plan.stages[2].conv;
  // make_plan validates the svd view (V as a (R3, R13, 1, kw) conv weight); the
  // kernel gets G2 itself, read as that weight, so its packed panels are cached
  // against the layer's own factor rather than a per-call view.
  const std::vector<at::Tensor> as_svd{g2.unsqueeze(2), u3};
  const Plan second = make_plan(mid, as_svd, bias, horizontal.stride, horizontal.padding, horizontal.dilation, 1,
                                "svd");
  return hsv_fused_forward(mid, {g2, u3}, bias, second, uk, "svd").contiguous(fmt);
}

}  // namespace cpu
}  // namespace hsv
