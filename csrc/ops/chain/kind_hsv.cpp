// kind "hsv": HSV-2, the nearest-Kronecker-product SVD of the im2col weight with
// merged factors (docs/methods.md §2.2), plus optional level-2 SVDs of the merged
// factors (§2.3). The layout is described in hsvkernels/formats/hsv.py.
//
// Level 1, factors [B (P, T2, S2, kh, kw), A (T1, S1, P)]:
//   stage 0: view (N*S1, S2, H, W), kh x kw conv with B as (P*T2, S2, kh, kw)
//   stage 1: view (N, S1*P, T2*Ho, Wo), 1x1 conv with A as (T1, S1*P, 1, 1)
//   output view (N, T1*T2, Ho, Wo)
// Level 2 replaces B by [B1 (q1, S2, kh, kw), B2 (P, T2, q1)] (a conv S2 -> q1 then
// a 1x1 q1 -> P*T2) and/or A by [A1 (q2, S1, P), A2 (T1, q2)] (two GEMMs). Factor
// 0 being 4-D rather than 5-D says B is split; 2 factors after the B part say A is.
#include "conv_chain.h"
#include "hsv_layout.h"

namespace hsv {
namespace {

#define HSV_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "hsv::conv2d(kind='hsv'): ", __VA_ARGS__)

const char* kLayouts =
    "[B (P, T2, S2, kh, kw), A (T1, S1, P)], [B1 (q1, S2, kh, kw), B2 (P, T2, q1), A (T1, S1, P)], "
    "[B (P, T2, S2, kh, kw), A1 (q2, S1, P), A2 (T1, q2)] or "
    "[B1 (q1, S2, kh, kw), B2 (P, T2, q1), A1 (q2, S1, P), A2 (T1, q2)]";

bool all_positive(at::IntArrayRef sizes) {
  for (auto s : sizes)
    if (s <= 0) return false;
  return true;
}

Plan build_hsv_plan(const at::Tensor& input, at::TensorList factors, const ConvParams& conv) {
  const int64_t nf = static_cast<int64_t>(factors.size());
  HSV_CHECK(nf >= 2 && nf <= 4, "expected 2 to 4 factors, one of ", kLayouts, "; got ", nf);
  for (int64_t i = 0; i < nf; ++i)
    HSV_CHECK(all_positive(factors[i].sizes()), "factors[", i, "] has an empty dimension: ", factors[i].sizes());
  const HsvLayout layout = hsv_layout(factors);
  const bool split_b = layout.split_b, split_a = layout.split_a;
  const int64_t a_at = layout.a_at;
  HSV_CHECK(factors[0].dim() == 5 || split_b,
            "factors[0] must be B (P, T2, S2, kh, kw) or B1 (q1, S2, kh, kw), got shape ", factors[0].sizes());
  HSV_CHECK(nf > a_at && nf - a_at <= 2, "expected ", kLayouts, "; got ", nf, " factors with factors[0] of shape ",
            factors[0].sizes());

  int64_t P, T2, S2, kh, kw, q1 = 0;
  if (split_b) {
    const auto& B1 = factors[0];
    const auto& B2 = factors[1];
    q1 = B1.size(0), S2 = B1.size(1), kh = B1.size(2), kw = B1.size(3);
    HSV_CHECK(B2.dim() == 3 && B2.size(2) == q1, "factors[1] (B2) must be (P, T2, q1) with q1 = ", q1,
              " from factors[0] (B1), got shape ", B2.sizes());
    P = B2.size(0), T2 = B2.size(1);
  } else {
    const auto& B = factors[0];
    P = B.size(0), T2 = B.size(1), S2 = B.size(2), kh = B.size(3), kw = B.size(4);
  }
  int64_t T1, S1, q2 = 0;
  if (split_a) {
    const auto& A1 = factors[a_at];
    const auto& A2 = factors[a_at + 1];
    HSV_CHECK(A1.dim() == 3 && A1.size(2) == P, "factors[", a_at, "] (A1) must be (q2, S1, P) with P = ", P,
              ", got shape ", A1.sizes());
    q2 = A1.size(0), S1 = A1.size(1);
    HSV_CHECK(A2.dim() == 2 && A2.size(1) == q2, "factors[", a_at + 1, "] (A2) must be (T1, q2) with q2 = ", q2,
              " from factors[", a_at, "] (A1), got shape ", A2.sizes());
    T1 = A2.size(0);
  } else {
    const auto& A = factors[a_at];
    HSV_CHECK(A.dim() == 3 && A.size(2) == P, "factors[", a_at, "] (A) must be (T1, S1, P) with P = ", P,
              " Kronecker terms, got shape ", A.sizes());
    T1 = A.size(0), S1 = A.size(1);
  }
  const int64_t cin = S1 * S2;
  HSV_CHECK(input.size(1) == cin, "input has ", input.size(1), " channels but the factors expect Cin = S1 * S2 = ",
            S1, " * ", S2, " = ", cin);

  const int64_t n = input.size(0);
  Plan plan = plan_for_output(input, T1 * T2, kh, kw, conv);
  const int64_t ho = plan.out_shape[2], wo = plan.out_shape[3];
  // Stage 1 runs the S1 input-channel groups as batch entries, all with the same weights.
  const std::vector<int64_t> folded = {n * S1, S2, input.size(2), input.size(3)};
  if (split_b) {
    plan.stages.push_back(Stage{0, {q1, S2, kh, kw}, folded, conv});
    plan.stages.push_back(Stage{1, {P * T2, q1, 1, 1}, {n * S1, q1, ho, wo}, kPointwise});
  } else {
    plan.stages.push_back(Stage{0, {P * T2, S2, kh, kw}, folded, conv});
  }
  // Stage 2 contracts (s1, p) with t2 moved into the spatial rows: a GEMM per image.
  const std::vector<int64_t> gemm_view = {n, S1 * P, T2 * ho, wo};
  if (split_a) {
    plan.stages.push_back(Stage{a_at, {q2, S1 * P, 1, 1}, gemm_view, kPointwise});
    plan.stages.push_back(Stage{a_at + 1, {T1, q2, 1, 1}, {n, q2, T2 * ho, wo}, kPointwise});
  } else {
    plan.stages.push_back(Stage{a_at, {T1, S1 * P, 1, 1}, gemm_view, kPointwise});
  }
  return plan;
}

const bool registered = (register_kind("hsv", build_hsv_plan), true);

}  // namespace
}  // namespace hsv
