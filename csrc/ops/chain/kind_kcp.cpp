// kind "kcp": 2nd-order Kronecker CP (KCP-FGTD, methods.md §3.3), with the
// channel-only factor B_n on the outer Kronecker side and the spatial factor A_n
// on the inner side:  W[(t1,t2),(s1,s2),i,j] = sum_n B_n[t1,s1] A_n[t2,s2,i,j],
// B_n of rank Q, A_n of CP rank R. (A_n outer cannot be run with reshapes only.)
//
// factors, in stage order (6 = four layers with L2 and L4 split per factor):
//   0 bs (Q, N, S1)   1 as (N, R, S2)   2 ah (N, R, kh)   3 aw (N, R, kw)
//   4 at (N, T2, R)   5 bt (T1, Q, N)
// merged form (5 factors): 0..3 as above, 4 M (Cout, Q, N, R) = bt x at as one GEMM.
// Activation index order after each stage (batch first, then channels, H, W):
//   x           b (s1 s2) h w
//   0 1x1       b (q n) (s2 h) w           contract s1, s2 rides in the height
//   1 1x1 g=N   (b q) (n r) h w            contract s2 per n
//   2 kh x 1    depthwise, stride/pad/dilation of the height
//   3 1 x kw    depthwise, stride/pad/dilation of the width
//   4 1x1 g=N   (b q) (n t2) h' w'         contract r per n
//   5 1x1       b t1 (t2 h') w'            contract (q n), t2 rides in the height
//   merged 4    b t h' w'                  contract (q n r)
#include "conv_chain.h"

namespace hsv {
namespace {

#define KCP_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "hsv::conv2d(kind='kcp'): ", __VA_ARGS__)

Plan build_kcp_plan(const at::Tensor& input, at::TensorList factors, const ConvParams& conv) {
  const bool merged = factors.size() == 5;
  KCP_CHECK(factors.size() == 6 || merged,
            "expected 6 factors [bs (Q, N, S1), as (N, R, S2), ah (N, R, kh), aw (N, R, kw), at (N, T2, R), "
            "bt (T1, Q, N)] or 5 (merged) [bs, as, ah, aw, M (Cout, Q, N, R)], got ", factors.size());
  const char* names[] = {"bs (Q, N, S1)", "as (N, R, S2)", "ah (N, R, kh)", "aw (N, R, kw)",
                         merged ? "M (Cout, Q, N, R)" : "at (N, T2, R)", "bt (T1, Q, N)"};
  for (size_t f = 0; f < factors.size(); ++f) {
    const int64_t want = (merged && f == 4) ? 4 : 3;
    KCP_CHECK(factors[f].dim() == want, "factors[", f, "] (", names[f], ") must be ", want, "-D, got shape ",
              factors[f].sizes());
    for (int64_t d = 0; d < want; ++d)
      KCP_CHECK(factors[f].size(d) > 0, "factors[", f, "] (", names[f], ") has an empty dimension: ",
                factors[f].sizes());
  }
  const int64_t q = factors[0].size(0), n = factors[0].size(1), s1 = factors[0].size(2);
  const int64_t r = factors[1].size(1), s2 = factors[1].size(2);
  const int64_t kh = factors[2].size(2), kw = factors[3].size(2);
  for (int f = 1; f <= 3; ++f)
    KCP_CHECK(factors[f].size(0) == n && factors[f].size(1) == r, "factors[", f, "] (", names[f],
              ") has shape ", factors[f].sizes(), " but factors[0] and factors[1] give N = ", n, ", R = ", r);
  int64_t cout, t2 = 0;
  if (merged) {
    const auto& m = factors[4];
    KCP_CHECK(m.size(1) == q && m.size(2) == n && m.size(3) == r, "factors[4] (", names[4], ") has shape ",
              m.sizes(), ", expected (Cout, ", q, ", ", n, ", ", r, ")");
    cout = m.size(0);
  } else {
    const auto& at_ = factors[4];
    const auto& bt = factors[5];
    KCP_CHECK(at_.size(0) == n && at_.size(2) == r, "factors[4] (", names[4], ") has shape ", at_.sizes(),
              ", expected (", n, ", T2, ", r, ")");
    KCP_CHECK(bt.size(1) == q && bt.size(2) == n, "factors[5] (", names[5], ") has shape ", bt.sizes(),
              ", expected (T1, ", q, ", ", n, ")");
    t2 = at_.size(1);
    cout = bt.size(0) * t2;
  }
  KCP_CHECK(input.size(1) == s1 * s2, "input has ", input.size(1), " channels but the factors expect Cin = S1*S2 = ",
            s1, "*", s2, " = ", s1 * s2);
  const int64_t b = input.size(0), h = input.size(2), w = input.size(3);
  Plan plan = plan_for_output(input, cout, kh, kw, conv);
  const int64_t ho = plan.out_shape[2], wo = plan.out_shape[3];
  auto grouped = [](int64_t g) { return ConvParams{{1, 1}, {0, 0}, {1, 1}, g}; };
  plan.stages.push_back(Stage{0, {q * n, s1, 1, 1}, {b, s1, s2 * h, w}, kPointwise});
  plan.stages.push_back(Stage{1, {n * r, s2, 1, 1}, {b * q, n * s2, h, w}, grouped(n)});
  plan.stages.push_back(Stage{2, {n * r, 1, kh, 1}, {b * q, n * r, h, w},
                              ConvParams{{conv.stride[0], 1}, {conv.padding[0], 0}, {conv.dilation[0], 1}, n * r}});
  plan.stages.push_back(Stage{3, {n * r, 1, 1, kw}, {b * q, n * r, ho, w},
                              ConvParams{{1, conv.stride[1]}, {0, conv.padding[1]}, {1, conv.dilation[1]}, n * r}});
  if (merged) {
    plan.stages.push_back(Stage{4, {cout, q * n * r, 1, 1}, {b, q * n * r, ho, wo}, kPointwise});
  } else {
    plan.stages.push_back(Stage{4, {n * t2, r, 1, 1}, {b * q, n * r, ho, wo}, grouped(n)});
    plan.stages.push_back(Stage{5, {cout / t2, q * n, 1, 1}, {b, q * n, t2 * ho, wo}, kPointwise});
  }
  return plan;
}

const bool registered = (register_kind("kcp", build_kcp_plan), true);

}  // namespace
}  // namespace hsv
