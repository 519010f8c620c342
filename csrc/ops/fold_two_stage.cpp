#include "fold_two_stage.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <ATen/ops/einsum.h>
#include <ATen/ops/matmul.h>

#include <functional>
#include <initializer_list>

#include "chain/hsv_layout.h"
#include "cpu/pack.h"

namespace hsv {
namespace {

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t;
}

}  // namespace

int64_t fold_rank(at::TensorList factors, const std::string& kind) {
  const size_t nf = factors.size();
  auto dims = [&](std::initializer_list<int64_t> want) {  // the factor ranks kind's layout has
    if (nf != want.size()) return false;
    size_t i = 0;
    for (int64_t d : want)
      if (factors[i++].dim() != d) return false;
    return true;
  };
  if (kind == "tucker2") return dims({2, 4, 2}) ? factors[1].size(0) : 0;                  // R_T of the core
  if (kind == "ht2" || kind == "tt_tucker") return dims({2, 3, 3, 2}) ? factors[2].size(0) : 0;  // R3 of G2
  if (kind == "cp") return dims({2, 2, 2, 2}) ? factors[0].size(0) : 0;                    // R of A_S
  if (kind != "hsv" || nf < 2 || nf > 4) return 0;
  const HsvLayout l = hsv_layout(factors);
  if (!l.split_b && !l.split_a) return 0;  // level 1 already
  if (!(l.split_b ? dims({4, 3, 3}) || dims({4, 3, 3, 2}) : dims({5, 3, 2}))) return 0;
  if (factors[l.a_at].size(1) != 1) return 0;  // S1 > 1: not one conv then one GEMM
  const at::Tensor& b = factors[l.split_b ? 1 : 0];  // B2 (P, T2, q1) or B (P, T2, S2, kh, kw)
  return b.size(0) * b.size(1);
}

std::optional<TwoStageFold> fold_two_stage(at::TensorList factors, const std::string& kind, bool cache) {
  if (fold_rank(factors, kind) == 0) return std::nullopt;
  const at::NoGradGuard no_grad;  // runs inside the op's kernel: the products are constants there
  const at::ScalarType dtype = factors[0].scalar_type(), ct = compute_type(dtype);
  auto up = [ct](const at::Tensor& t) { return t.to(ct); };
  // One product, cached against `primary` and `deps` (every other factor it reads).
  auto product = [&](const std::string& role, const at::Tensor& primary, std::vector<at::Tensor> deps,
                     const std::function<at::Tensor()>& make) {
    auto make_rounded = [&] { return make().to(dtype).contiguous(); };
    if (!cache) return make_rounded();
    return cpu::packed_cached(primary, "fold:" + kind + ":" + role, [&] {
      // A product made under torch.inference_mode would be an inference tensor, which the
      // two-stage kernel's own cache of packed factors never keeps: it would repack per call.
      const c10::InferenceMode normal_tensors(false);
      const at::NoGradGuard still_no_grad;  // InferenceMode(false) turns grad mode back on
      return make_rounded();
    }, deps);
  };

  if (kind == "tucker2") {
    const at::Tensor &us = factors[0], &core = factors[1];
    at::Tensor v = product("V", core, {us}, [&] { return at::einsum("tsij,sc->tcij", {up(core), up(us)}); });
    return TwoStageFold{"svd", {v, factors[2]}};
  }
  if (kind == "ht2" || kind == "tt_tucker") {
    const at::Tensor &u1 = factors[0], &g1 = factors[1], &g2 = factors[2];
    at::Tensor v = product("V", g2, {g1, u1}, [&] {
      const at::Tensor vertical = at::einsum("bai,as->bis", {up(g1), up(u1)});  // (R13, kh, Cin)
      return at::einsum("cbj,bis->csij", {up(g2), vertical});
    });
    return TwoStageFold{"svd", {v, factors[3]}};
  }
  if (kind == "cp") {
    const at::Tensor &as = factors[0], &ah = factors[1], &aw = factors[2];
    at::Tensor v = product("V", as, {ah, aw}, [&] { return at::einsum("rs,ri,rj->rsij", {up(as), up(ah), up(aw)}); });
    return TwoStageFold{"svd", {v, factors[3]}};
  }
  // hsv with level-2 factors: multiply out whichever side is split (formats/hsv.py, merged()).
  const HsvLayout l = hsv_layout(factors);
  at::Tensor b = factors[0];
  if (l.split_b) {
    const at::Tensor &b1 = factors[0], &b2 = factors[1];  // B1 (q1, S2, kh, kw), B2 (P, T2, q1)
    b = product("B", b2, {b1}, [&] {
      const int64_t q1 = b1.size(0);
      return at::matmul(up(b2).reshape({-1, q1}), up(b1).reshape({q1, -1}))
          .reshape({b2.size(0), b2.size(1), b1.size(1), b1.size(2), b1.size(3)});
    });
  }
  at::Tensor a = factors[l.a_at];
  if (l.split_a) {
    const at::Tensor &a1 = factors[l.a_at], &a2 = factors[l.a_at + 1];  // A1 (q2, S1, P), A2 (T1, q2)
    a = product("A", a2, {a1}, [&] {
      const int64_t q2 = a1.size(0);
      return at::matmul(up(a2), up(a1).reshape({q2, -1})).reshape({a2.size(0), a1.size(1), a1.size(2)});
    });
  }
  return TwoStageFold{"hsv", {b, a}};
}

}  // namespace hsv
