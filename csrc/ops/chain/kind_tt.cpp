// kind "tt": TT-conv with tensorized channels (Garipov et al. 2016), the spatial core
// at the end of the train so that no stage needs a permute. Layout and maths in
// hsvkernels/formats/tt.py. With S = Cin = S_1*...*S_d (input modes) and
// T = Cout = T_1*...*T_d (output modes), row-major:
// factors = [G_1 (1, T_1, S_1, r_1), ..., G_d (r_{d-1}, T_d, S_d, r_d), K (r_d, kh, kw)]
// stage 0: view (N*S, 1, H, W), kh x kw conv 1 -> r_d with the layer's stride/padding/dilation
// stage k = d..1: view (N*S_1..S_{k-1}, S_k*r_k, T_{k+1}..T_d*Ho, Wo), 1x1 conv with G_k
//          as (r_{k-1}*T_k, S_k*r_k, 1, 1); the finished output modes ride in the rows
// output view (N, T, Ho, Wo)
// Where it costs no more MACs, stage 0 and stage d run as one conv (tt_merges_last_core).
// The 1x1 contractions run as batched matmuls (Stage::gemm).
#include "conv_chain.h"

namespace hsv {
namespace {

#define TT_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "hsv::conv2d(kind='tt'): ", __VA_ARGS__)

// Whether the op runs G_d and K as one kh x kw conv S_d -> r_{d-1}*T_d instead of the
// 1 -> r_d conv on every input channel plus a 1x1 contraction: when that costs no more
// MACs (per input channel and position: r_{d-1}*T_d*k^2 against r_d*k^2 + r_d*r_{d-1}*T_d).
// A conv with one input channel runs far below a real conv's speed, and the merged form
// never materialises the r_d-times-the-input intermediate. Mirrored in formats/tt.py.
bool tt_merges_last_core(int64_t r_before, int64_t t_last, int64_t r_last, int64_t k2) {
  return r_before * t_last * k2 <= r_last * k2 + r_last * r_before * t_last;
}

const char* kLayout = "[G_1 (1, T_1, S_1, r_1), ..., G_d (r_{d-1}, T_d, S_d, r_d), K (r_d, kh, kw)]";

Plan build_tt_plan(const at::Tensor& input, at::TensorList factors, const ConvParams& conv) {
  const int64_t nf = static_cast<int64_t>(factors.size());
  TT_CHECK(nf >= 2, "expected d + 1 >= 2 factors ", kLayout, ", got ", nf);
  const int64_t d = nf - 1;
  for (int64_t k = 0; k < d; ++k)
    TT_CHECK(factors[k].dim() == 4, "factors[", k, "] (G_", k + 1, ") must be 4-D (r_", k, ", T_", k + 1, ", S_",
             k + 1, ", r_", k + 1, "), got shape ", factors[k].sizes());
  const auto& K = factors[d];
  TT_CHECK(K.dim() == 3, "factors[", d, "] (K, the last factor) must be 3-D (r_d, kh, kw), got shape ", K.sizes());
  for (int64_t k = 0; k < nf; ++k)
    for (auto s : factors[k].sizes()) TT_CHECK(s > 0, "factors[", k, "] has an empty dimension: ", factors[k].sizes());
  TT_CHECK(factors[0].size(0) == 1, "factors[0] (G_1) must have r_0 = 1 as its first dimension, got shape ",
           factors[0].sizes());
  for (int64_t k = 1; k <= d; ++k) {
    const int64_t prev = factors[k - 1].size(3);
    if (k == d) {
      TT_CHECK(K.size(0) == prev, "rank mismatch: factors[", k - 1, "] (G_", k, ") has r_", k, " = ", prev,
               " but factors[", k, "] (K) has shape ", K.sizes(), ", expected (", prev, ", kh, kw)");
    } else {
      TT_CHECK(factors[k].size(0) == prev, "rank mismatch: factors[", k - 1, "] (G_", k, ") has r_", k, " = ", prev,
               " but factors[", k, "] (G_", k + 1, ") has shape ", factors[k].sizes(), ", expected (", prev, ", T_",
               k + 1, ", S_", k + 1, ", r_", k + 1, ")");
    }
  }
  std::vector<int64_t> out_modes(d), in_modes(d), ranks(d + 1);
  ranks[0] = 1;
  int64_t cin = 1, cout = 1;
  for (int64_t k = 0; k < d; ++k) {
    out_modes[k] = factors[k].size(1);
    in_modes[k] = factors[k].size(2);
    ranks[k + 1] = factors[k].size(3);
    cout *= out_modes[k];
    cin *= in_modes[k];
  }
  TT_CHECK(input.size(1) == cin, "input has ", input.size(1), " channels but the factors expect Cin = ", cin,
           " (the product of their S_k)");
  const int64_t kh = K.size(1), kw = K.size(2);
  const int64_t n = input.size(0), h = input.size(2), w = input.size(3);
  Plan plan = plan_for_output(input, cout, kh, kw, conv);
  const int64_t ho = plan.out_shape[2], wo = plan.out_shape[3];
  const int64_t s_last = in_modes[d - 1], t_last = out_modes[d - 1];
  int64_t s_before = cin / s_last, t_after = t_last;
  if (tt_merges_last_core(ranks[d - 1], t_last, ranks[d], kh * kw)) {
    // One kh x kw conv S_d -> r_{d-1}*T_d with weight G_d @ K on the view (N*S_<d, S_d, H, W).
    Stage merged{d - 1, {ranks[d - 1] * t_last, s_last, kh, kw}, {n * s_before, s_last, h, w}, conv};
    merged.right_factor = d;
    merged.inner = ranks[d];
    plan.stages.push_back(merged);
  } else {
    // Every input channel is a batch entry of the spatial conv, all with the same weights.
    plan.stages.push_back(Stage{d, {ranks[d], 1, kh, kw}, {n * cin, 1, h, w}, conv});
    Stage last{d - 1, {ranks[d - 1] * t_last, s_last * ranks[d], 1, 1}, {n * s_before, s_last * ranks[d], ho, wo},
               kPointwise};
    last.gemm = true;
    plan.stages.push_back(last);
  }
  for (int64_t k = d - 2; k >= 0; --k) {
    s_before /= in_modes[k];
    // A GEMM per batch entry of the view: few channels, many rows, where oneDNN's 1x1 conv is slow.
    Stage contraction{k, {ranks[k] * out_modes[k], in_modes[k] * ranks[k + 1], 1, 1},
                      {n * s_before, in_modes[k] * ranks[k + 1], t_after * ho, wo}, kPointwise};
    contraction.gemm = true;
    plan.stages.push_back(contraction);
    t_after *= out_modes[k];
  }
  return plan;
}

const bool registered = (register_kind("tt", build_tt_plan), true);

}  // namespace
}  // namespace hsv
