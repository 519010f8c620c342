// AVX-512 microkernels: 12 rows x 32 columns (24 zmm accumulators, 2 zmm of b
// per k step, one broadcast per row) and a narrow 12 x 16 variant (even and
// odd k steps in two accumulator sets: 59-70% -> 67-82% of peak). 12 rows,
// not 8: on L1-resident data 8 x 32 reached 73-78% of the measured FMA peak
// and 12 x 32 80-82% (14 x 32 was no better); bench/peak.py measures both.
// Compiled for AVX-512 through a function attribute rather than a file-wide
// -mavx512f, so nothing else in this object (inline library code, static
// initializers) can contain AVX-512 instructions that would run before the
// run-time ISA check.
#include "ukernel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace hsv {
namespace cpu {
namespace {

constexpr int kMR = 12;
constexpr int kW = 16;  // floats per vector

// NV vectors per row: NR = NV * kW.
template <int NV>
__attribute__((target("avx512f"))) void kernel(int64_t K, const float* const* a, int64_t ka, const float* b, float* c,
                                           int64_t ldc, bool accumulate, const float* init) {
  constexpr int kNR = NV * kW;
  __m512 acc[kMR][NV];
  const float* ap[kMR];
#pragma GCC unroll 12
  for (int i = 0; i < kMR; ++i) {
    ap[i] = a[i];
    const float* src = accumulate ? c + i * ldc : init;
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[i][v] = src ? _mm512_loadu_ps(src + v * kW) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + k * kNR + v * kW);
#pragma GCC unroll 12
    for (int i = 0; i < kMR; ++i) {
      const __m512 ai = _mm512_set1_ps(ap[i][k * ka]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < kMR; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + v * kW, acc[i][v]);
  }
}

// The narrow (MR x 16) kernel with K split into even and odd steps, each with
// its own MR accumulators (summed at the end): one vector of B per k step
// feeds only MR FMAs, and two independent sets keep more FMAs in flight.
__attribute__((target("avx512f"))) void kernel_narrow(int64_t K, const float* const* a, int64_t ka, const float* b,
                                                      float* c, int64_t ldc, bool accumulate, const float* init) {
  __m512 acc0[kMR], acc1[kMR];
  const float* ap[kMR];
#pragma GCC unroll 12
  for (int i = 0; i < kMR; ++i) {
    ap[i] = a[i];
    const float* src = accumulate ? c + i * ldc : init;
    acc0[i] = src ? _mm512_loadu_ps(src) : _mm512_setzero_ps();
    acc1[i] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
    const __m512 b0 = _mm512_loadu_ps(b + k * kW), b1 = _mm512_loadu_ps(b + (k + 1) * kW);
#pragma GCC unroll 12
    for (int i = 0; i < kMR; ++i) {
      acc0[i] = _mm512_fmadd_ps(_mm512_set1_ps(ap[i][k * ka]), b0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(_mm512_set1_ps(ap[i][(k + 1) * ka]), b1, acc1[i]);
    }
  }
  if (k < K) {
    const __m512 b0 = _mm512_loadu_ps(b + k * kW);
#pragma GCC unroll 12
    for (int i = 0; i < kMR; ++i) acc0[i] = _mm512_fmadd_ps(_mm512_set1_ps(ap[i][k * ka]), b0, acc0[i]);
  }
#pragma GCC unroll 12
  for (int i = 0; i < kMR; ++i) _mm512_storeu_ps(c + i * ldc, _mm512_add_ps(acc0[i], acc1[i]));
}

// Depthwise rows (DepthwiseFn): 16 channels per vector, the tail masked.
__attribute__((target("avx512f"))) void depthwise(int64_t C, int64_t npix, int64_t taps, const float* const* x,
                                                  int64_t xs, const float* const* w, float* y, int64_t ys) {
  for (int64_t p = 0; p < npix; ++p) {
    for (int64_t c = 0; c < C; c += kW) {
      const __mmask16 m = C - c >= kW ? __mmask16(0xffff) : __mmask16((1u << (C - c)) - 1);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t t = 0; t < taps; ++t) {
        if (x[t] == nullptr) continue;
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w[t] + c), _mm512_maskz_loadu_ps(m, x[t] + p * xs + c), acc);
      }
      _mm512_mask_storeu_ps(y + p * ys + c, m, acc);
    }
  }
}

}  // namespace

const Microkernel* microkernel_avx512() {
  static const Microkernel narrow{"avx512", kMR, kW, &kernel_narrow, nullptr, &depthwise};
  static const Microkernel wide{"avx512", kMR, 2 * kW, &kernel<2>, &narrow, &depthwise};
  return &wide;
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
