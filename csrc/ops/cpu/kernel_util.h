// Small pieces the fused CPU kernels (hsv_fused.cpp, kcp_fused.cpp,
// pointwise_nchw.cpp) share: integer rounding, how many threads a call uses,
// and the per-output-channel bias pass over freshly written NCHW rows.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace hsv {
namespace cpu {

inline int64_t div_up(int64_t v, int64_t m) { return (v + m - 1) / m; }
inline int64_t round_up(int64_t v, int64_t m) { return div_up(v, m) * m; }

// Threads for a fused call of `macs` multiply-adds. Small problems run on the
// calling thread: waking the OpenMP team costs microseconds (far more when the
// cores are oversubscribed), more than a convolution of under ~2^20 MACs takes
// (about 10 us on one core).
inline int64_t fused_threads(int64_t macs) {
  return macs < (int64_t(1) << 20) ? 1 : std::max<int64_t>(1, at::get_num_threads());
}

// dst[i * ld + j] += bias[i] for i < rows, j < len: the bias of `rows` output
// channels on the runs of their planes just written (still in L1).
inline void add_row_bias(float* dst, int64_t ld, int64_t rows, int64_t len, const float* bias) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = dst + i * ld;
    const float bi = bias[i];
    for (int64_t j = 0; j < len; ++j) row[j] += bi;
  }
}

}  // namespace cpu
}  // namespace hsv
