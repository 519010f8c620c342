// AVX-512 microkernels: 12 rows x 32 columns (24 zmm accumulators, 2 zmm of b
// per k step, one broadcast per row), a narrow 12 x 16 variant (even and
// odd k steps in two accumulator sets: 59-70% -> 67-82% of peak), and an
// 8 x 48 one for N in (32, 48] (24 accumulators; 11 loads per 24 FMAs where
// the narrow kernel has 13 per 12: a rank-48 conv stage ran at 50% of peak
// in place, load-bound, bench/results/cpu-fused-notes.md). 12 rows,
// not 8: on L1-resident data 8 x 32 reached 73-78% of the measured FMA peak
// and 12 x 32 80-82% (14 x 32 was no better); bench/peak.py measures both.
// Compiled for AVX-512 through a function attribute rather than a file-wide
// -mavx512f, so nothing else in this object (inline library code, static
// initializers) can contain AVX-512 instructions that would run before the
// run-time ISA check.
#include "ukernel.h"

#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace hsv {
namespace cpu {
namespace {

constexpr int kMR = 12;
constexpr int kMR3 = 8;  // rows of the three-vector kernel
constexpr int kW = 16;   // floats per vector

// One k step: acc[i] += a_of(i) * (the NR-wide row of b at brow), where
// a_of(i) reads row i's A value (through a row pointer, or from a packed A).
template <int MR, int NV, typename AOf>
__attribute__((target("avx512f"), always_inline)) inline void k_step(__m512 (&acc)[MR][NV], const AOf& a_of,
                                                                     const float* brow) {
  __m512 bv[NV];
#pragma GCC unroll 3
  for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(brow + v * kW);
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    const __m512 ai = _mm512_set1_ps(a_of(i));
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
  }
}

// MR rows, NV vectors per row: NR = NV * kW.
template <int MR, int NV>
__attribute__((target("avx512f"))) void kernel(int64_t K, const float* const* a, int64_t ka, const float* b, float* c,
                                           int64_t ldc, bool accumulate, const float* init) {
  constexpr int kNR = NV * kW;
  __m512 acc[MR][NV];
  const float* ap[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    ap[i] = a[i];
    const float* src = accumulate ? c + i * ldc : init;
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[i][v] = src ? _mm512_loadu_ps(src + v * kW) : _mm512_setzero_ps();
  }
  int64_t k = 0;
  if (ka == 1) {
    // Contiguous rows (every NHWC or packed operand): four k steps per
    // iteration, each row's four broadcasts at displacements from one shared
    // offset, so the loop's pointer and counter work is paid once per four.
    for (; k + 4 <= K; k += 4) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) k_step<MR, NV>(acc, [&](int i) { return ap[i][k + u]; }, b + (k + u) * kNR);
    }
  }
  for (; k < K; ++k) k_step<MR, NV>(acc, [&](int i) { return ap[i][k * ka]; }, b + k * kNR);
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + v * kW, acc[i][v]);
  }
}

// MicrokernelStridedFn: MR x NV*16 of C = A @ B, A packed (a[k * MR + i]),
// B read in place at row stride ldb. A single A pointer leaves the
// general-purpose registers that MR row pointers took for B, ldb and pf.
template <int MR, int NV>
__attribute__((target("avx512f"))) void kernel_strided(int64_t K, const float* a, const float* b, int64_t ldb,
                                                   float* c, int64_t ldc, const float* pf) {
  __m512 acc[MR][NV];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  if (pf != nullptr) {
    for (int64_t k = 0; k < K; ++k, a += MR, b += ldb, pf += ldb) {
      // every line of the row: NR floats span NV or NV + 1 lines (planes need not be 64-byte aligned)
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) _mm_prefetch(reinterpret_cast<const char*>(pf + v * kW), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pf + NV * kW - 1), _MM_HINT_T0);
      k_step<MR, NV>(acc, [&](int i) { return a[i]; }, b);
    }
  } else {
    for (int64_t k = 0; k < K; ++k, a += MR, b += ldb) k_step<MR, NV>(acc, [&](int i) { return a[i]; }, b);
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + v * kW, acc[i][v]);
  }
}

// MicrokernelBRowsFn: as kernel_strided without the prefetch, B's row k at b[k] + boff.
template <int MR, int NV>
__attribute__((target("avx512f"))) void kernel_b_rows(int64_t K, const float* a, const float* const* b, int64_t boff,
                                                  float* c, int64_t ldc) {
  __m512 acc[MR][NV];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k, a += MR) k_step<MR, NV>(acc, [&](int i) { return a[i]; }, b[k] + boff);
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 3
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

// r[i] (lane j) -> r[j] (lane i): unpack pairs of rows (ps, then pd), which
// leaves u[g][m] holding, in 128-bit lane l, column 4l + m of rows 4g..4g+3;
// then two rounds of 128-bit lane shuffles gather column 4l + m's four lanes.
__attribute__((target("avx512f"))) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  __m512 u[4][4];  // [row group g][column m within a lane]
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 1]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[g][0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[g][1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[g][2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[g][3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int m = 0; m < 4; ++m) {
    const __m512 x0 = _mm512_shuffle_f32x4(u[0][m], u[1][m], 0x44), x1 = _mm512_shuffle_f32x4(u[0][m], u[1][m], 0xEE);
    const __m512 y0 = _mm512_shuffle_f32x4(u[2][m], u[3][m], 0x44), y1 = _mm512_shuffle_f32x4(u[2][m], u[3][m], 0xEE);
    r[m] = _mm512_shuffle_f32x4(x0, y0, 0x88);
    r[4 + m] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
    r[8 + m] = _mm512_shuffle_f32x4(x1, y1, 0x88);
    r[12 + m] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
  }
}

// ToPixelMajorFn: 16 channels x 16 pixels per block; channel and pixel tails
// through masked loads and stores, so there is no scalar edge.
__attribute__((target("avx512f"))) void to_pixel_major(int64_t C, int64_t npix, const float* src, int64_t src_cs,
                                                       float* dst, int64_t dst_ps) {
  for (int64_t c0 = 0; c0 < C; c0 += kW) {
    const int64_t cn = std::min<int64_t>(kW, C - c0);
    const __mmask16 cm = cn == kW ? __mmask16(0xffff) : __mmask16((1u << cn) - 1);
    for (int64_t p0 = 0; p0 < npix; p0 += kW) {
      const int64_t pn = std::min<int64_t>(kW, npix - p0);
      const __mmask16 pm = pn == kW ? __mmask16(0xffff) : __mmask16((1u << pn) - 1);
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < cn ? _mm512_maskz_loadu_ps(pm, src + (c0 + i) * src_cs + p0) : _mm512_setzero_ps();
      transpose16(r);
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j)
        if (j < pn) _mm512_mask_storeu_ps(dst + (p0 + j) * dst_ps + c0, cm, r[j]);
    }
  }
}

}  // namespace

const Microkernel* microkernel_avx512() {
  static const Microkernel narrow{"avx512", kMR, kW, &kernel_narrow, nullptr, &depthwise, &to_pixel_major};
  static const Microkernel three{"avx512", kMR3, 3 * kW, &kernel<kMR3, 3>, nullptr, &depthwise, &to_pixel_major};
  static const Microkernel wide{"avx512", kMR, 2 * kW, &kernel<kMR, 2>, &narrow, &depthwise, &to_pixel_major,
                                &three, &kernel_strided<kMR, 2>, &kernel_strided<8, 2>, 8,
                                &kernel_b_rows<kMR, 2>, &kernel_b_rows<8, 2>};
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
