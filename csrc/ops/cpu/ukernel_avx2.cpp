// AVX2+FMA microkernel: 6 rows x 16 columns (12 ymm accumulators, 2 ymm of b
// per k step, one broadcast per row: 15 of the 16 ymm registers). Compiled
// for AVX2 through a function attribute, for the same reason as the AVX-512
// kernel: nothing else in this object may use the wider ISA.
#include "ukernel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace hsv {
namespace cpu {
namespace {

constexpr int kMR = 6;
constexpr int kNR = 16;

__attribute__((target("avx2,fma"))) void kernel(int64_t K, const float* const* a, const float* b, float* c,
                                                int64_t ldc, bool accumulate,
                                                const float* init) {
  __m256 acc[kMR][2];
  const float* ap[kMR];
#pragma GCC unroll 6
  for (int i = 0; i < kMR; ++i) {
    ap[i] = a[i];
    const float* src = accumulate ? c + i * ldc : init;
    acc[i][0] = src ? _mm256_loadu_ps(src) : _mm256_setzero_ps();
    acc[i][1] = src ? _mm256_loadu_ps(src + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * kNR);
    const __m256 b1 = _mm256_loadu_ps(b + k * kNR + 8);
#pragma GCC unroll 6
    for (int i = 0; i < kMR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(ap[i] + k);
      acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < kMR; ++i) {
    _mm256_storeu_ps(c + i * ldc, acc[i][0]);
    _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
  }
}

}  // namespace

const Microkernel* microkernel_avx2() {
  static const Microkernel k{"avx2", kMR, kNR, &kernel};
  return &k;
}

}  // namespace cpu
}  // namespace hsv

#else

namespace hsv {
namespace cpu {
const Microkernel* microkernel_avx2() { return nullptr; }
}  // namespace cpu
}  // namespace hsv

#endif
