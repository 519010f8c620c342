// Portable microkernel (no intrinsics; the compiler may vectorize it for the
// baseline ISA, e.g. SSE2 on x86-64). The fallback for CPUs without AVX2 and
// for non-x86 builds, and a third independent path for the tests.
#include "ukernel.h"

namespace hsv {
namespace cpu {
namespace {

constexpr int kMR = 4;
constexpr int kNR = 8;

void kernel(int64_t K, const float* const* a, int64_t ka, const float* b, float* c, int64_t ldc, bool accumulate,
            const float* init) {
  float acc[kMR][kNR];
  for (int i = 0; i < kMR; ++i) {
    const float* src = accumulate ? c + i * ldc : init;
    for (int j = 0; j < kNR; ++j) acc[i][j] = src ? src[j] : 0.0f;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * kNR;
    for (int i = 0; i < kMR; ++i) {
      const float ai = a[i][k * ka];
      for (int j = 0; j < kNR; ++j) acc[i][j] += ai * bk[j];
    }
  }
  for (int i = 0; i < kMR; ++i)
    for (int j = 0; j < kNR; ++j) c[i * ldc + j] = acc[i][j];
}

}  // namespace

const Microkernel* microkernel_scalar() {
  static const Microkernel k{"scalar", kMR, kNR, &kernel, nullptr};
  return &k;
}

const Microkernel& microkernel_for_width(const Microkernel& uk, int64_t n) {
  if (uk.narrow == nullptr) return uk;
  const int64_t padded = (n + uk.nr - 1) / uk.nr * uk.nr;
  return 4 * (padded - n) >= padded ? *uk.narrow : uk;
}

}  // namespace cpu
}  // namespace hsv
