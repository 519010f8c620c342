// AVX2+FMA microkernels: 6 rows x 16 columns (12 ymm accumulators, 2 ymm of b
// per k step, one broadcast per row: 15 of the 16 ymm registers), a narrow
// (even and odd k steps in two accumulator sets: 66% -> 69-84% of peak)
// 6 x 8 variant, and a 4 x 24 one for N in (16, 24] (12 accumulators, 3 ymm
// of b, one broadcast: all 16 registers; 7 loads per 12 FMAs where the narrow
// kernel has 7 per 6, as AVX-512's 8 x 48). Compiled for AVX2 through a function attribute, for the same
// reason as the AVX-512 kernels: nothing else in this object may use the ISA.
#include "ukernel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace hsv {
namespace cpu {
namespace {

constexpr int kMR = 6;
constexpr int kMR3 = 4;  // rows of the three-vector kernel
constexpr int kW = 8;    // floats per vector

// One k step: acc[i] += *a_at(i) * (the NR-wide row of b at brow), where
// a_at(i) points at row i's A value (through a row pointer, or in a packed A).
template <int MR, int NV, typename AAt>
__attribute__((target("avx2,fma"), always_inline)) inline void k_step(__m256 (&acc)[MR][NV], const AAt& a_at,
                                                                      const float* brow) {
  __m256 bv[NV];
#pragma GCC unroll 3
  for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(brow + v * kW);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m256 ai = _mm256_broadcast_ss(a_at(i));
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(ai, bv[v], acc[i][v]);
  }
}

// acc = C (accumulate), else init in every row, else zeros.
template <int MR, int NV>
__attribute__((target("avx2,fma"), always_inline)) inline void load_c(__m256 (&acc)[MR][NV], const float* c,
                                                                      int64_t ldc, bool accumulate,
                                                                      const float* init) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const float* src = accumulate ? c + i * ldc : init;
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[i][v] = src ? _mm256_loadu_ps(src + v * kW) : _mm256_setzero_ps();
  }
}

template <int MR, int NV>
__attribute__((target("avx2,fma"), always_inline)) inline void store_c(__m256 (&acc)[MR][NV], float* c,
                                                                       int64_t ldc) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + i * ldc + v * kW, acc[i][v]);
  }
}

// K steps of rows a[0..MR) (element k of row i at a[i] + k * ka) against B.
template <int MR, int NV>
__attribute__((target("avx2,fma"), always_inline)) inline void k_loop(__m256 (&acc)[MR][NV], int64_t K,
                                                                      const float* const* a, int64_t ka,
                                                                      const float* b) {
  const float* ap[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) ap[i] = a[i];
  for (int64_t k = 0; k < K; ++k) k_step<MR, NV>(acc, [&](int i) { return ap[i] + k * ka; }, b + k * NV * kW);
}

// MR rows, NV vectors per row: NR = NV * kW.
template <int MR, int NV>
__attribute__((target("avx2,fma"))) void kernel(int64_t K, const float* const* a, int64_t ka, const float* b, float* c,
                                           int64_t ldc, bool accumulate, const float* init) {
  __m256 acc[MR][NV];
  load_c<MR, NV>(acc, c, ldc, accumulate, init);
  k_loop<MR, NV>(acc, K, a, ka, b);
  store_c<MR, NV>(acc, c, ldc);
}

// MicrokernelTapsFn: kernel over `taps` K-slices, C in registers throughout.
template <int MR, int NV>
__attribute__((target("avx2,fma"))) void kernel_taps(int64_t taps, int64_t K, const float* const* a, int64_t ka,
                                                 const float* b, float* c, int64_t ldc, bool accumulate,
                                                 const float* init) {
  __m256 acc[MR][NV];
  load_c<MR, NV>(acc, c, ldc, accumulate, init);
  for (int64_t t = 0; t < taps; ++t) k_loop<MR, NV>(acc, K, a + t * MR, ka, b + t * K * NV * kW);
  store_c<MR, NV>(acc, c, ldc);
}

// MicrokernelStridedFn: MR x NV*8 of C = A @ B, A packed (a[k * MR + i]), B
// read in place at row stride ldb (as the AVX-512 one).
template <int MR, int NV>
__attribute__((target("avx2,fma"))) void kernel_strided(int64_t K, const float* a, const float* b, int64_t ldb,
                                                    float* c, int64_t ldc, const float* pf) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k, a += MR, b += ldb) {
    if (pf != nullptr) {  // the row's first and last float: every line it spans
      _mm_prefetch(reinterpret_cast<const char*>(pf + k * ldb), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pf + k * ldb + NV * kW - 1), _MM_HINT_T0);
    }
    k_step<MR, NV>(acc, [&](int i) { return a + i; }, b);
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + i * ldc + v * kW, acc[i][v]);
  }
}

// MicrokernelBRowsFn: as kernel_strided, B's row k at b[k] + boff.
template <int MR, int NV>
__attribute__((target("avx2,fma"))) void kernel_b_rows(int64_t K, const float* a, const float* const* b, int64_t boff,
                                                    float* c, int64_t ldc) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k, a += MR) k_step<MR, NV>(acc, [&](int i) { return a + i; }, b[k] + boff);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + i * ldc + v * kW, acc[i][v]);
  }
}

// The narrow (MR x 8) kernel with K split into even and odd steps, each with
// its own MR accumulators (summed at the end): MR = 6 chains alone cannot
// cover FMA latency x 2 ports; two sets give 12 in flight.
__attribute__((target("avx2,fma"))) void kernel_narrow_taps(int64_t taps, int64_t K, const float* const* a,
                                                        int64_t ka, const float* b, float* c, int64_t ldc,
                                                        bool accumulate, const float* init) {
  __m256 acc0[kMR], acc1[kMR];
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) {
    const float* src = accumulate ? c + i * ldc : init;
    acc0[i] = src ? _mm256_loadu_ps(src) : _mm256_setzero_ps();
    acc1[i] = _mm256_setzero_ps();
  }
  for (int64_t t = 0; t < taps; ++t, a += kMR, b += K * kW) {
    const float* ap[kMR];
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) ap[i] = a[i];
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
  }
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) _mm256_storeu_ps(c + i * ldc, _mm256_add_ps(acc0[i], acc1[i]));
}

__attribute__((target("avx2,fma"))) void kernel_narrow(int64_t K, const float* const* a, int64_t ka, const float* b,
                                                   float* c, int64_t ldc, bool accumulate, const float* init) {
  kernel_narrow_taps(1, K, a, ka, b, c, ldc, accumulate, init);
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

// r[i] (lane j) -> r[j] (lane i): unpack pairs of rows (ps, then pd), which
// leaves u[g][m] holding, in 128-bit lane l, column 4l + m of rows 4g..4g+3;
// then one 128-bit lane permute per output row.
__attribute__((target("avx2,fma"))) inline void transpose8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  __m256 u[2][4];
  for (int g = 0; g < 2; ++g) {
    const __m256d a = _mm256_castps_pd(t[4 * g]), b = _mm256_castps_pd(t[4 * g + 2]);
    const __m256d c = _mm256_castps_pd(t[4 * g + 1]), d = _mm256_castps_pd(t[4 * g + 3]);
    u[g][0] = _mm256_castpd_ps(_mm256_unpacklo_pd(a, b));
    u[g][1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a, b));
    u[g][2] = _mm256_castpd_ps(_mm256_unpacklo_pd(c, d));
    u[g][3] = _mm256_castpd_ps(_mm256_unpackhi_pd(c, d));
  }
  for (int m = 0; m < 4; ++m) {
    r[m] = _mm256_permute2f128_ps(u[0][m], u[1][m], 0x20);
    r[4 + m] = _mm256_permute2f128_ps(u[0][m], u[1][m], 0x31);
  }
}

// ToPixelMajorFn: whole 8 x 8 blocks in registers; the channel and pixel
// tails (no masked stores narrower than a vector here) take the scalar copy.
__attribute__((target("avx2,fma"))) void to_pixel_major(int64_t C, int64_t npix, const float* src, int64_t src_cs,
                                                       float* dst, int64_t dst_ps) {
  const int64_t c_full = C / kW * kW, p_full = npix / kW * kW;
  for (int64_t c0 = 0; c0 < c_full; c0 += kW) {
    for (int64_t p0 = 0; p0 < p_full; p0 += kW) {
      __m256 r[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (c0 + i) * src_cs + p0);
      transpose8(r);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (p0 + j) * dst_ps + c0, r[j]);
    }
  }
  if (p_full < npix) to_pixel_major_scalar(c_full, npix - p_full, src + p_full, src_cs, dst + p_full * dst_ps, dst_ps);
  if (c_full < C) to_pixel_major_scalar(C - c_full, npix, src + c_full * src_cs, src_cs, dst + c_full, dst_ps);
}

}  // namespace

const Microkernel* microkernel_avx2() {
  static const Microkernel narrow{"avx2", kMR, kW, &kernel_narrow, nullptr, &depthwise, &to_pixel_major,
                                  nullptr, nullptr, nullptr, 0, nullptr, nullptr, &kernel_narrow_taps};
  static const Microkernel three{"avx2", kMR3, 3 * kW, &kernel<kMR3, 3>, nullptr, &depthwise, &to_pixel_major,
                                 nullptr, nullptr, nullptr, 0, nullptr, nullptr, &kernel_taps<kMR3, 3>};
  static const Microkernel wide{"avx2", kMR, 2 * kW, &kernel<kMR, 2>, &narrow, &depthwise, &to_pixel_major,
                                &three, &kernel_strided<kMR, 2>, &kernel_strided<4, 2>, 4,
                                &kernel_b_rows<kMR, 2>, &kernel_b_rows<4, 2>, &kernel_taps<kMR, 2>};
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
