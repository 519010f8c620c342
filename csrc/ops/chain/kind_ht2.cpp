// kinds "ht2" (Gabor & Zdunek 2023) and "tt_tucker" (Tucker-2 on channels + TT of the
// core). Both are the same four-conv layout, a tensor train of the kernel in mode order
// (Cin, kh, kw, Cout); only how the factors are found differs, so one builder serves both.
// factors = [U1 (R1, Cin), G1 (R13, R1, kh), G2 (R3, R13, kw), U3 (Cout, R3)]
// stage 0: 1x1 conv Cin -> R1 at the input resolution
// stage 1: kh x 1 conv R1 -> R13: stride (s_h, 1), padding (p_h, 0), dilation (d_h, 1)
// stage 2: 1 x kw conv R13 -> R3: stride (1, s_w), padding (0, p_w), dilation (1, d_w)
// stage 3: 1x1 conv R3 -> Cout
#include "conv_chain.h"

#include <string>

namespace hsv {
namespace {

PlanBuilder separable_builder(const std::string& kind) {
  return [kind](const at::Tensor& input, at::TensorList factors, const ConvParams& conv) {
    const std::string who = "hsv::conv2d(kind='" + kind + "'): ";
    TORCH_CHECK_VALUE(factors.size() == 4, who, "expected 4 factors [U1 (R1, Cin), G1 (R13, R1, kh), ",
                      "G2 (R3, R13, kw), U3 (Cout, R3)], got ", factors.size());
    const auto& U1 = factors[0];
    const auto& G1 = factors[1];
    const auto& G2 = factors[2];
    const auto& U3 = factors[3];
    TORCH_CHECK_VALUE(U1.dim() == 2, who, "factors[0] (U1) must be 2-D (R1, Cin), got shape ", U1.sizes());
    TORCH_CHECK_VALUE(G1.dim() == 3, who, "factors[1] (G1) must be 3-D (R13, R1, kh), got shape ", G1.sizes());
    TORCH_CHECK_VALUE(G2.dim() == 3, who, "factors[2] (G2) must be 3-D (R3, R13, kw), got shape ", G2.sizes());
    TORCH_CHECK_VALUE(U3.dim() == 2, who, "factors[3] (U3) must be 2-D (Cout, R3), got shape ", U3.sizes());
    const int64_t r1 = U1.size(0), cin = U1.size(1);
    const int64_t r13 = G1.size(0), kh = G1.size(2);
    const int64_t r3 = G2.size(0), kw = G2.size(2);
    const int64_t cout = U3.size(0);
    TORCH_CHECK_VALUE(r1 > 0 && r13 > 0 && r3 > 0 && kh > 0 && kw > 0 && cout > 0, who,
                      "a factor has an empty dimension: U1 ", U1.sizes(), ", G1 ", G1.sizes(), ", G2 ", G2.sizes(),
                      ", U3 ", U3.sizes());
    TORCH_CHECK_VALUE(G1.size(1) == r1, who, "rank mismatch: factors[0] (U1) has R1 = ", r1,
                      " but factors[1] (G1) has shape ", G1.sizes(), ", expected (R13, ", r1, ", kh)");
    TORCH_CHECK_VALUE(G2.size(1) == r13, who, "rank mismatch: factors[1] (G1) has R13 = ", r13,
                      " but factors[2] (G2) has shape ", G2.sizes(), ", expected (R3, ", r13, ", kw)");
    TORCH_CHECK_VALUE(U3.size(1) == r3, who, "rank mismatch: factors[2] (G2) has R3 = ", r3,
                      " but factors[3] (U3) has shape ", U3.sizes(), ", expected (Cout, ", r3, ")");
    TORCH_CHECK_VALUE(input.size(1) == cin, who, "input has ", input.size(1),
                      " channels but factors[0] (U1) expects Cin = ", cin);
    const int64_t n = input.size(0), h = input.size(2), w = input.size(3);
    Plan plan = plan_for_output(input, cout, kh, kw, conv);
    const int64_t ho = plan.out_shape[2], wo = plan.out_shape[3];
    const ConvParams vertical{{conv.stride[0], 1}, {conv.padding[0], 0}, {conv.dilation[0], 1}, 1};
    const ConvParams horizontal{{1, conv.stride[1]}, {0, conv.padding[1]}, {1, conv.dilation[1]}, 1};
    plan.stages.push_back(Stage{0, {r1, cin, 1, 1}, input.sizes().vec(), kPointwise});
    plan.stages.push_back(Stage{1, {r13, r1, kh, 1}, {n, r1, h, w}, vertical});
    plan.stages.push_back(Stage{2, {r3, r13, 1, kw}, {n, r13, ho, w}, horizontal});
    plan.stages.push_back(Stage{3, {cout, r3, 1, 1}, {n, r3, ho, wo}, kPointwise});
    return plan;
  };
}

const bool registered = (register_kind("ht2", separable_builder("ht2")),
                          register_kind("tt_tucker", separable_builder("tt_tucker")), true);

}  // namespace
}  // namespace hsv
