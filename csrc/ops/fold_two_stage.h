// Kinds whose chain, as a linear map, is one kh x kw conv to a rank-r
// intermediate followed by a 1x1 conv to the output channels, once the factors
// before that intermediate are multiplied out. Folded that way they run in the
// two-stage fused kernels written for "svd" and "hsv" (cuda/two_stage_fused.h):
//   tucker2 [U_S, core, U_T]          svd  V = core x_S U_S          (R_T, Cin, kh, kw), U = U_T
//   ht2, tt_tucker [U1, G1, G2, U3]   svd  V[c,s,i,j] = sum_(b,a) G2[c,b,j] G1[b,a,i] U1[a,s]
//                                                                    (R3, Cin, kh, kw), U = U3
//   cp [A_S, A_h, A_w, A_T]           svd  V[r,s,i,j] = A_S[r,s] A_h[r,i] A_w[r,j]  (R, Cin, kh, kw), U = A_T
//   hsv level 2, S1 = 1               hsv  [B, A] of level 1: B = B2 B1, A = A2 A1 (formats/hsv.py)
// The price is arithmetic: the folded conv does R*Cin*kh*kw MACs per output
// pixel where the chain did, for tucker2, R_S*Cin (at the input resolution) +
// R_T*R_S*kh*kw. That buys one kernel with the intermediate on chip instead of
// three or four cuDNN convs with theirs in memory; which is faster is measured
// per layer (HSV_CUDA_IMPL=auto), never assumed.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace hsv {

struct TwoStageFold {
  std::string kind;                 // "svd" or "hsv" (level 1, S1 = 1)
  std::vector<at::Tensor> factors;  // that kind's factors, in the input factors' dtype and device
};

// The folded intermediate's channel count (R_T, R3, R or P*T2) for factors that
// make_plan accepted for `kind`, or 0 where the kind does not fold (kcp, tt,
// svd and hsv level 1, which need no folding, hsv with S1 > 1).
int64_t fold_rank(at::TensorList factors, const std::string& kind);

// The folded factors, or nullopt where fold_rank is 0. Products are computed in
// fp32 for fp16/bf16 factors (each folded element rounded once) and in the
// factors' dtype otherwise. With `cache`, each product is kept against the
// factors it came from (cpu::packed_cached with dependencies) and recomputed
// only after one of them changes; without it (while a CUDA graph is captured,
// so that replays see in-place updates of the factors) it is computed per call.
std::optional<TwoStageFold> fold_two_stage(at::TensorList factors, const std::string& kind, bool cache);

}  // namespace hsv
