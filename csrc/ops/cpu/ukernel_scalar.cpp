// Portable microkernel (no intrinsics; the compiler may vectorize it for the
// baseline ISA, e.g. SSE2 on x86-64). The fallback for CPUs without AVX2 and
// for non-x86 builds, and a third independent path for the tests.
#include "ukernel.h"

namespace hsv {
namespace cpu {
namespace {

constexpr int kMR = 4;
constexpr int kNR = 8;

// acc += K steps of rows a[0..kMR) (element k of row i at a[i][k * ka]) against B.
void k_loop(float (&acc)[kMR][kNR], int64_t K, const float* const* a, int64_t ka, const float* b) {
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * kNR;
    for (int i = 0; i < kMR; ++i) {
      const float ai = a[i][k * ka];
      for (int j = 0; j < kNR; ++j) acc[i][j] += ai * bk[j];
    }
  }
}

void kernel_taps(int64_t taps, int64_t K, const float* const* a, int64_t ka, const float* b, float* c, int64_t ldc,
                 bool accumulate, const float* init) {
  float acc[kMR][kNR];
  for (int i = 0; i < kMR; ++i) {
    const float* src = accumulate ? c + i * ldc : init;
    for (int j = 0; j < kNR; ++j) acc[i][j] = src ? src[j] : 0.0f;
  }
  for (int64_t t = 0; t < taps; ++t) k_loop(acc, K, a + t * kMR, ka, b + t * K * kNR);
  for (int i = 0; i < kMR; ++i)
    for (int j = 0; j < kNR; ++j) c[i * ldc + j] = acc[i][j];
}

void kernel(int64_t K, const float* const* a, int64_t ka, const float* b, float* c, int64_t ldc, bool accumulate,
            const float* init) {
  kernel_taps(1, K, a, ka, b, c, ldc, accumulate, init);
}

void kernel_strided(int64_t K, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc, const float*) {
  float acc[kMR][kNR] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int i = 0; i < kMR; ++i)
      for (int j = 0; j < kNR; ++j) acc[i][j] += a[k * kMR + i] * b[k * ldb + j];
  for (int i = 0; i < kMR; ++i)
    for (int j = 0; j < kNR; ++j) c[i * ldc + j] = acc[i][j];
}

void kernel_b_rows(int64_t K, const float* a, const float* const* b, int64_t boff, float* c, int64_t ldc) {
  float acc[kMR][kNR] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int i = 0; i < kMR; ++i)
      for (int j = 0; j < kNR; ++j) acc[i][j] += a[k * kMR + i] * b[k][boff + j];
  for (int i = 0; i < kMR; ++i)
    for (int j = 0; j < kNR; ++j) c[i * ldc + j] = acc[i][j];
}

void depthwise(int64_t C, int64_t npix, int64_t taps, const float* const* x, int64_t xs, const float* const* w,
               float* y, int64_t ys) {
  for (int64_t p = 0; p < npix; ++p) {
    float* yp = y + p * ys;
    for (int64_t c = 0; c < C; ++c) yp[c] = 0.0f;
    for (int64_t t = 0; t < taps; ++t) {
      if (x[t] == nullptr) continue;
      const float* xp = x[t] + p * xs;
      for (int64_t c = 0; c < C; ++c) yp[c] += w[t][c] * xp[c];
    }
  }
}

}  // namespace

void to_pixel_major_scalar(int64_t C, int64_t npix, const float* src, int64_t src_cs, float* dst, int64_t dst_ps) {
  constexpr int64_t kCb = 16;  // channels per pass: 16 read streams, 64-byte writes
  for (int64_t c0 = 0; c0 < C; c0 += kCb) {
    const int64_t c1 = c0 + kCb < C ? c0 + kCb : C;
    for (int64_t p = 0; p < npix; ++p)
      for (int64_t c = c0; c < c1; ++c) dst[p * dst_ps + c] = src[c * src_cs + p];
  }
}

const Microkernel* microkernel_scalar() {
  static const Microkernel k{"scalar", kMR, kNR, &kernel, nullptr, &depthwise, &to_pixel_major_scalar, nullptr,
                             &kernel_strided, nullptr, 0, &kernel_b_rows, nullptr, &kernel_taps};
  return &k;
}

const Microkernel& microkernel_for_width(const Microkernel& uk, int64_t n, bool any_mr) {
  if (uk.narrow == nullptr) return uk;
  const int64_t padded = (n + uk.nr - 1) / uk.nr * uk.nr;
  if (4 * (padded - n) < padded) return uk;
  if (any_mr && uk.three != nullptr && n > uk.nr && n <= uk.three->nr) return *uk.three;
  return *uk.narrow;
}

PackedARows packed_a_rows(const Microkernel& uk, int64_t rows) {
  const int64_t m = uk.strided_short_mr;
  const auto padded = [&](int64_t mr) { return (rows + mr - 1) / mr * mr; };
  if (uk.strided_short != nullptr && 10 * padded(m) < 9 * padded(uk.mr))
    return {m, uk.strided_short, uk.b_rows_short};
  return {uk.mr, uk.strided, uk.b_rows};
}

}  // namespace cpu
}  // namespace hsv
