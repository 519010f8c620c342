// kind "tucker2": Tucker-2 (Kim et al. 2016) on the two channel modes of the kernel,
// W = core x_T U_T x_S U_S.
// factors = [U_S (R_S, Cin), core (R_T, R_S, kh, kw), U_T (Cout, R_T)]
// stage 0: 1x1 conv Cin -> R_S at the input resolution
// stage 1: kh x kw conv R_S -> R_T with the layer's stride/padding/dilation
// stage 2: 1x1 conv R_T -> Cout
#include "conv_chain.h"

namespace hsv {
namespace {

Plan build_tucker2_plan(const at::Tensor& input, at::TensorList factors, const ConvParams& conv) {
  TORCH_CHECK_VALUE(factors.size() == 3, "hsv::conv2d(kind='tucker2'): expected 3 factors [U_S (R_S, Cin), ",
                    "core (R_T, R_S, kh, kw), U_T (Cout, R_T)], got ", factors.size());
  const auto& US = factors[0];
  const auto& G = factors[1];
  const auto& UT = factors[2];
  TORCH_CHECK_VALUE(US.dim() == 2, "hsv::conv2d(kind='tucker2'): factors[0] (U_S) must be 2-D (R_S, Cin), got shape ",
                    US.sizes());
  TORCH_CHECK_VALUE(G.dim() == 4,
                    "hsv::conv2d(kind='tucker2'): factors[1] (core) must be 4-D (R_T, R_S, kh, kw), got shape ",
                    G.sizes());
  TORCH_CHECK_VALUE(UT.dim() == 2, "hsv::conv2d(kind='tucker2'): factors[2] (U_T) must be 2-D (Cout, R_T), got shape ",
                    UT.sizes());
  const int64_t rs = US.size(0), cin = US.size(1);
  const int64_t rt = G.size(0), kh = G.size(2), kw = G.size(3);
  const int64_t cout = UT.size(0);
  TORCH_CHECK_VALUE(rs > 0 && rt > 0 && kh > 0 && kw > 0 && cout > 0,
                    "hsv::conv2d(kind='tucker2'): a factor has an empty dimension: U_S ", US.sizes(), ", core ",
                    G.sizes(), ", U_T ", UT.sizes());
  TORCH_CHECK_VALUE(G.size(1) == rs, "hsv::conv2d(kind='tucker2'): rank mismatch: factors[0] (U_S) has R_S = ", rs,
                    " but factors[1] (core) has shape ", G.sizes(), ", expected (R_T, ", rs, ", kh, kw)");
  TORCH_CHECK_VALUE(UT.size(1) == rt, "hsv::conv2d(kind='tucker2'): rank mismatch: factors[1] (core) has R_T = ", rt,
                    " but factors[2] (U_T) has shape ", UT.sizes(), ", expected (Cout, ", rt, ")");
  TORCH_CHECK_VALUE(input.size(1) == cin, "hsv::conv2d(kind='tucker2'): input has ", input.size(1),
                    " channels but factors[0] (U_S) expects Cin = ", cin);
  const int64_t n = input.size(0), h = input.size(2), w = input.size(3);
  Plan plan = plan_for_output(input, cout, kh, kw, conv);
  const int64_t ho = plan.out_shape[2], wo = plan.out_shape[3];
  plan.stages.push_back(Stage{0, {rs, cin, 1, 1}, input.sizes().vec(), kPointwise});
  plan.stages.push_back(Stage{1, {rt, rs, kh, kw}, {n, rs, h, w}, conv});
  plan.stages.push_back(Stage{2, {cout, rt, 1, 1}, {n, rt, ho, wo}, kPointwise});
  return plan;
}

const bool registered = (register_kind("tucker2", build_tucker2_plan), true);

}  // namespace
}  // namespace hsv
