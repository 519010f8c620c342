// AVX-512 microkernel: 8 rows x 32 columns (16 zmm accumulators, 2 zmm of b per
// k step, one broadcast per row). Compiled for AVX-512 through a function
// attribute rather than a file-wide -mavx512f, so nothing else in this object
// (inline library code, static initializers) can contain AVX-512 instructions
// that would run before the run-time ISA check.
#include "ukernel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace hsv {
namespace cpu {
namespace {

constexpr int kMR = 8;
constexpr int kNR = 32;

__attribute__((target("avx512f"))) void kernel(int64_t K, const float* const* a, const float* b, float* c,
                                               int64_t ldc, bool accumulate,
                                               const float* init) {
  __m512 acc[kMR][2];
  const float* ap[kMR];
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) {
    ap[i] = a[i];
    const float* src = accumulate ? c + i * ldc : init;
    acc[i][0] = src ? _mm512_loadu_ps(src) : _mm512_setzero_ps();
    acc[i][1] = src ? _mm512_loadu_ps(src + 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * kNR);
    const __m512 b1 = _mm512_loadu_ps(b + k * kNR + 16);
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      const __m512 ai = _mm512_set1_ps(ap[i][k]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) {
    _mm512_storeu_ps(c + i * ldc, acc[i][0]);
    _mm512_storeu_ps(c + i * ldc + 16, acc[i][1]);
  }
}

}  // namespace

const Microkernel* microkernel_avx512() {
  static const Microkernel k{"avx512", kMR, kNR, &kernel};
  return &k;
}

}  // namespace cpu
}  // namespace hsv

#else

namespace hsv {
namespace cpu {
const Microkernel* microkernel_avx512() { return nullptr; }
}  // namespace cpu
}  // namespace hsv

#endif
