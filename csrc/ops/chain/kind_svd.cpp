// kind "svd": truncated SVD of the im2col weight W.reshape(Cout, Cin*kh*kw) = U @ V.
// factors = [V (r, Cin, kh, kw), U (Cout, r)]
// stage 0: kh x kw conv Cin -> r with the layer's stride/padding/dilation
// stage 1: 1x1 conv r -> Cout (a GEMM over the r channels)
#include "conv_chain.h"

namespace hsv {
namespace {

Plan build_svd_plan(const at::Tensor& input, at::TensorList factors, const ConvParams& conv) {
  TORCH_CHECK_VALUE(factors.size() == 2, "hsv::conv2d(kind='svd'): expected 2 factors [V (r, Cin, kh, kw), ",
                    "U (Cout, r)], got ", factors.size());
  const auto& V = factors[0];
  const auto& U = factors[1];
  TORCH_CHECK_VALUE(V.dim() == 4, "hsv::conv2d(kind='svd'): factors[0] (V) must be 4-D (r, Cin, kh, kw), got shape ",
                    V.sizes());
  TORCH_CHECK_VALUE(U.dim() == 2, "hsv::conv2d(kind='svd'): factors[1] (U) must be 2-D (Cout, r), got shape ",
                    U.sizes());
  const int64_t r = V.size(0), cin = V.size(1), kh = V.size(2), kw = V.size(3);
  TORCH_CHECK_VALUE(r > 0 && kh > 0 && kw > 0, "hsv::conv2d(kind='svd'): factors[0] (V) has an empty dimension: ",
                    V.sizes());
  TORCH_CHECK_VALUE(U.size(1) == r, "hsv::conv2d(kind='svd'): rank mismatch: factors[0] (V) has r = ", r,
                    " but factors[1] (U) has shape ", U.sizes(), ", expected (Cout, ", r, ")");
  TORCH_CHECK_VALUE(U.size(0) > 0, "hsv::conv2d(kind='svd'): factors[1] (U) has Cout = 0");
  TORCH_CHECK_VALUE(input.size(1) == cin, "hsv::conv2d(kind='svd'): input has ", input.size(1),
                    " channels but factors[0] (V) expects Cin = ", cin);
  const int64_t n = input.size(0), cout = U.size(0);
  Plan plan = plan_for_output(input, cout, kh, kw, conv);
  const int64_t ho = plan.out_shape[2], wo = plan.out_shape[3];
  plan.stages.push_back(Stage{0, {r, cin, kh, kw}, input.sizes().vec(), conv});
  plan.stages.push_back(Stage{1, {cout, r, 1, 1}, {n, r, ho, wo}, kPointwise});
  return plan;
}

const bool registered = (register_kind("svd", build_svd_plan), true);

}  // namespace
}  // namespace hsv
