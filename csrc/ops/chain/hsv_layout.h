// Which of kind "hsv"'s four factor layouts a factor list has (kind_hsv.cpp):
// B (P, T2, S2, kh, kw), or B1 (q1, S2, kh, kw) and B2 (P, T2, q1), then A
// (T1, S1, P), or A1 (q2, S1, P) and A2 (T1, q2). Read from the factor count
// and factors[0]'s rank only; kind_hsv.cpp checks the rest.
#pragma once

#include <ATen/core/Tensor.h>

namespace hsv {

struct HsvLayout {
  bool split_b = false;  // B is given as B1, B2 (factors[0] is 4-D)
  int64_t a_at = 1;      // index of the first A factor
  bool split_a = false;  // A is given as A1, A2 (two factors from a_at on)
};

inline HsvLayout hsv_layout(at::TensorList factors) {
  HsvLayout l;
  l.split_b = factors[0].dim() == 4;
  l.a_at = l.split_b ? 2 : 1;
  l.split_a = static_cast<int64_t>(factors.size()) - l.a_at == 2;
  return l;
}

}  // namespace hsv
