// AVX2+FMA microkernels: 6 rows x 16 columns (12 ymm accumulators, 2 ymm of b
// per k step, one broadcast per row: 15 of the 16 ymm registers) and a narrow
// (even and odd k steps in two accumulator sets: 66% -> 69-84% of peak)
// 6 x 8 variant. Compiled for AVX2 through a function attribute, for the same
// reason as the AVX-512 kernels: nothing else in this object may use the ISA.
#include "ukernel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace hsv {
namespace cpu {
namespace {

constexpr int kMR = 6;
constexpr int kW = 8;  // floats per vector

// NV vectors per row: NR = NV * kW.
template <int NV>
__attribute__((target("avx2,fma"))) void kernel(int64_t K, const float* const* a, int64_t ka, const float* b, float* c,
                                           int64_t ldc, bool accumulate, const float* init) {
  constexpr int kNR = NV * kW;
  __m256 acc[kMR][NV];
  const float* ap[kMR];
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) {
    ap[i] = a[i];
    const float* src = accumulate ? c + i * ldc : init;
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[i][v] = src ? _mm256_loadu_ps(src + v * kW) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + k * kNR + v * kW);
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(ap[i] + k * ka);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(ai, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + i * ldc + v * kW, acc[i][v]);
  }
}

// The narrow (MR x 8) kernel with K split into even and odd steps, each with
// its own MR accumulators (summed at the end): MR = 6 chains alone cannot
// cover FMA latency x 2 ports; two sets give 12 in flight.
__attribute__((target("avx2,fma"))) void kernel_narrow(int64_t K, const float* const* a, int64_t ka, const float* b,
                                                   float* c, int64_t ldc, bool accumulate, const float* init) {
  __m256 acc0[kMR], acc1[kMR];
  const float* ap[kMR];
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) {
    ap[i] = a[i];
    const float* src = accumulate ? c + i * ldc : init;
    acc0[i] = src ? _mm256_loadu_ps(src) : _mm256_setzero_ps();
    acc1[i] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
    const __m256 b0 = _mm256_loadu_ps(b + k * kW), b1 = _mm256_loadu_ps(b + (k + 1) * kW);
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      acc0[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(ap[i] + k * ka), b0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(ap[i] + (k + 1) * ka), b1, acc1[i]);
    }
  }
  if (k < K) {
    const __m256 b0 = _mm256_loadu_ps(b + k * kW);
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) acc0[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(ap[i] + k * ka), b0, acc0[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) _mm256_storeu_ps(c + i * ldc, _mm256_add_ps(acc0[i], acc1[i]));
}

// Depthwise rows (DepthwiseFn): 8 channels per vector, a scalar tail.
__attribute__((target("avx2,fma"))) void depthwise(int64_t C, int64_t npix, int64_t taps, const float* const* x,
                                                   int64_t xs, const float* const* w, float* y, int64_t ys) {
  for (int64_t p = 0; p < npix; ++p) {
    int64_t c = 0;
    for (; c + kW <= C; c += kW) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t t = 0; t < taps; ++t) {
        if (x[t] == nullptr) continue;
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(w[t] + c), _mm256_loadu_ps(x[t] + p * xs + c), acc);
      }
      _mm256_storeu_ps(y + p * ys + c, acc);
    }
    for (; c < C; ++c) {
      float acc = 0.0f;
      for (int64_t t = 0; t < taps; ++t)
        if (x[t] != nullptr) acc += w[t][c] * x[t][p * xs + c];
      y[p * ys + c] = acc;
    }
  }
}

}  // namespace

const Microkernel* microkernel_avx2() {
  static const Microkernel narrow{"avx2", kMR, kW, &kernel_narrow, nullptr, &depthwise};
  static const Microkernel wide{"avx2", kMR, 2 * kW, &kernel<2>, &narrow, &depthwise};
  return &wide;
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
