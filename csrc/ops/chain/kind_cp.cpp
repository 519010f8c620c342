// kind "cp": CP-4 (Lebedev et al. 2015), W[t,s,i,j] = sum_r A_T[t,r] A_S[r,s] A_h[r,i] A_w[r,j].
// factors = [A_S (R, Cin), A_h (R, kh), A_w (R, kw), A_T (Cout, R)]
// stage 0: 1x1 conv Cin -> R at the input resolution
// stage 1: depthwise kh x 1 conv on R channels: stride (s_h, 1), padding (p_h, 0), dilation (d_h, 1)
// stage 2: depthwise 1 x kw conv on R channels: stride (1, s_w), padding (0, p_w), dilation (1, d_w)
// stage 3: 1x1 conv R -> Cout
// Splitting stride/padding/dilation per axis keeps the chain exact for any of them
// (zero padding commutes with the bias-free 1x1 before it).
#include "conv_chain.h"

namespace hsv {
namespace {

Plan build_cp_plan(const at::Tensor& input, at::TensorList factors, const ConvParams& conv) {
  TORCH_CHECK_VALUE(factors.size() == 4, "hsv::conv2d(kind='cp'): expected 4 factors [A_S (R, Cin), A_h (R, kh), ",
                    "A_w (R, kw), A_T (Cout, R)], got ", factors.size());
  const char* names[4] = {"A_S (R, Cin)", "A_h (R, kh)", "A_w (R, kw)", "A_T (Cout, R)"};
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK_VALUE(factors[i].dim() == 2, "hsv::conv2d(kind='cp'): factors[", i, "] (", names[i],
                      ") must be 2-D, got shape ", factors[i].sizes());
    TORCH_CHECK_VALUE(factors[i].size(0) > 0 && factors[i].size(1) > 0, "hsv::conv2d(kind='cp'): factors[", i,
                      "] (", names[i], ") has an empty dimension: ", factors[i].sizes());
  }
  const int64_t r = factors[0].size(0), cin = factors[0].size(1);
  const int64_t kh = factors[1].size(1), kw = factors[2].size(1), cout = factors[3].size(0);
  TORCH_CHECK_VALUE(factors[1].size(0) == r && factors[2].size(0) == r && factors[3].size(1) == r,
                    "hsv::conv2d(kind='cp'): rank mismatch: factors[0] (A_S) has R = ", r, " but A_h is ",
                    factors[1].sizes(), ", A_w is ", factors[2].sizes(), " and A_T is ", factors[3].sizes(),
                    "; expected (", r, ", kh), (", r, ", kw) and (Cout, ", r, ")");
  TORCH_CHECK_VALUE(input.size(1) == cin, "hsv::conv2d(kind='cp'): input has ", input.size(1),
                    " channels but factors[0] (A_S) expects Cin = ", cin);
  const int64_t n = input.size(0), h = input.size(2), w = input.size(3);
  Plan plan = plan_for_output(input, cout, kh, kw, conv);
  const int64_t ho = plan.out_shape[2], wo = plan.out_shape[3];
  const ConvParams vertical{{conv.stride[0], 1}, {conv.padding[0], 0}, {conv.dilation[0], 1}, r};
  const ConvParams horizontal{{1, conv.stride[1]}, {0, conv.padding[1]}, {1, conv.dilation[1]}, r};
  plan.stages.push_back(Stage{0, {r, cin, 1, 1}, input.sizes().vec(), kPointwise});
  plan.stages.push_back(Stage{1, {r, 1, kh, 1}, {n, r, h, w}, vertical});
  plan.stages.push_back(Stage{2, {r, 1, 1, kw}, {n, r, ho, w}, horizontal});
  plan.stages.push_back(Stage{3, {cout, r, 1, 1}, {n, r, ho, wo}, kPointwise});
  return plan;
}

const bool registered = (register_kind("cp", build_cp_plan), true);

}  // namespace
}  // namespace hsv
