// FMA-peak and microkernel microbenchmarks (see peak.h). The ISA-specific
// loops use function target attributes, like the microkernels, so this file
// builds for any x86-64 and only runs them after the run-time ISA check.
#include "peak.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <vector>

#include "isa.h"
#include "ukernel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HSV_X86 1
#endif

namespace hsv {
namespace cpu {
namespace {

// Independent chains: FMA latency (4 cycles on recent Intel cores) x 2 ports
// needs at least 8 in flight; more leaves slack for the loop overhead.
constexpr int kChainsAvx512 = 16;
constexpr int kChainsAvx2 = 12;  // of 16 ymm registers; 2 hold the constants
constexpr int kChainsScalar = 8;

volatile float g_sink;  // keeps the loops' results alive

#ifdef HSV_X86
__attribute__((target("avx512f"))) void fma_loop_avx512(int64_t iters) {
  __m512 acc[kChainsAvx512];
  for (int j = 0; j < kChainsAvx512; ++j) acc[j] = _mm512_set1_ps(0.001f * j);
  const __m512 m = _mm512_set1_ps(0.999999f), a = _mm512_set1_ps(1e-6f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int j = 0; j < kChainsAvx512; ++j) acc[j] = _mm512_fmadd_ps(acc[j], m, a);
  }
  __m512 s = acc[0];
  for (int j = 1; j < kChainsAvx512; ++j) s = _mm512_add_ps(s, acc[j]);
  float lanes[16];
  _mm512_storeu_ps(lanes, s);
  float t = 0.0f;
  for (float v : lanes) t += v;
  g_sink = t;
}

__attribute__((target("avx2,fma"))) void fma_loop_avx2(int64_t iters) {
  __m256 acc[kChainsAvx2];
  for (int j = 0; j < kChainsAvx2; ++j) acc[j] = _mm256_set1_ps(0.001f * j);
  const __m256 m = _mm256_set1_ps(0.999999f), a = _mm256_set1_ps(1e-6f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int j = 0; j < kChainsAvx2; ++j) acc[j] = _mm256_fmadd_ps(acc[j], m, a);
  }
  __m256 s = acc[0];
  for (int j = 1; j < kChainsAvx2; ++j) s = _mm256_add_ps(s, acc[j]);
  float lanes[8];
  _mm256_storeu_ps(lanes, s);
  float t = 0.0f;
  for (float v : lanes) t += v;
  g_sink = t;
}
#endif

void fma_loop_scalar(int64_t iters) {
  float acc[kChainsScalar];
  for (int j = 0; j < kChainsScalar; ++j) acc[j] = 0.001f * j;
  const float m = 0.999999f, a = 1e-6f;
  for (int64_t it = 0; it < iters; ++it) {
    for (int j = 0; j < kChainsScalar; ++j) acc[j] = acc[j] * m + a;
  }
  float t = 0.0f;
  for (float v : acc) t += v;
  g_sink = t;
}

// Runs work(n) in chunks of about 5 ms (n calibrated first) for `seconds` in
// all and returns the best rate, flop_per_unit * n / chunk time, in GFLOP/s.
double best_rate(const std::function<void(int64_t)>& work, double flop_per_unit, double seconds) {
  using clock = std::chrono::steady_clock;
  auto time_of = [&](int64_t n) {
    const auto t0 = clock::now();
    work(n);
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  int64_t n = 64;
  while (time_of(n) < 5e-3 && n < (int64_t(1) << 40)) n *= 2;
  double best = 0.0, spent = 0.0;
  int chunks = 0;
  while (spent < seconds || chunks < 3) {
    const double t = time_of(n);
    spent += t;
    ++chunks;
    if (t > 0) best = std::max(best, flop_per_unit * static_cast<double>(n) / t * 1e-9);
  }
  return best;
}

void check_isa(const std::string& isa, const char* what) {
  TORCH_CHECK_VALUE(isa == "avx512" || isa == "avx2" || isa == "scalar", what, ": isa='", isa,
                    "' is not one of 'avx512', 'avx2', 'scalar'");
  TORCH_CHECK(cpu_supports(isa), what, ": this CPU does not support ", isa, " (best available: '", best_isa(),
              "')");
}

}  // namespace

double fma_peak_gflops(const std::string& isa, double seconds) {
  check_isa(isa, "fma_peak_gflops");
#ifdef HSV_X86
  if (isa == "avx512") return best_rate(fma_loop_avx512, 2.0 * 16 * kChainsAvx512, seconds);
  if (isa == "avx2") return best_rate(fma_loop_avx2, 2.0 * 8 * kChainsAvx2, seconds);
#endif
  // One multiply and one add per chain step (x86-64's baseline has no FMA).
  return best_rate(fma_loop_scalar, 2.0 * kChainsScalar, seconds);
}

double microkernel_gflops(const std::string& isa, int64_t k, double seconds, const std::string& variant) {
  check_isa(isa, "microkernel_gflops");
  TORCH_CHECK_VALUE(k >= 1, "microkernel_gflops: k must be >= 1, got ", k);
  const Microkernel* wide = isa == "avx512" ? microkernel_avx512()
                            : isa == "avx2"  ? microkernel_avx2()
                                             : microkernel_scalar();
  TORCH_CHECK(wide != nullptr, "microkernel_gflops: this build has no ", isa, " microkernel");
  const bool strided = variant == "strided" || variant == "strided_short";
  const bool b_rows = variant == "b_rows" || variant == "b_rows_short";
  TORCH_CHECK_VALUE(variant == "wide" || variant == "narrow" || variant == "three" || strided || b_rows ||
                        variant == "taps",
                    "microkernel_gflops: variant must be 'wide', 'narrow', 'three', 'strided', 'strided_short', "
                    "'b_rows', 'b_rows_short' or 'taps', got '", variant, "'");
  if (strided || b_rows) {
    // The strided kernels (MicrokernelStridedFn): A packed (MR x K), B at row
    // stride NR (so L1-resident, as the first GEMM's later row blocks and the
    // second GEMM read it), C stored per call. The b_rows kernels
    // (MicrokernelBRowsFn) read the same B through one pointer per row.
    const bool is_short = variant == "strided_short" || variant == "b_rows_short";
    const MicrokernelStridedFn fn = strided ? (is_short ? wide->strided_short : wide->strided) : nullptr;
    const MicrokernelBRowsFn fn_rows = b_rows ? (is_short ? wide->b_rows_short : wide->b_rows) : nullptr;
    const int64_t mr = is_short ? wide->strided_short_mr : wide->mr;
    TORCH_CHECK_VALUE(fn != nullptr || fn_rows != nullptr, "microkernel_gflops: the ", isa, " microkernel has no ",
                      variant, " variant");
    std::vector<float> a(static_cast<size_t>(mr * k), 1e-3f), b(static_cast<size_t>(k * wide->nr), 1e-3f),
        c(static_cast<size_t>(mr * wide->nr), 0.0f);
    std::vector<const float*> rows(static_cast<size_t>(k));
    for (int64_t i = 0; i < k; ++i) rows[i] = b.data() + i * wide->nr;
    auto work = [&](int64_t calls) {
      for (int64_t j = 0; j < calls; ++j) {
        if (fn != nullptr) {
          fn(k, a.data(), b.data(), wide->nr, c.data(), wide->nr, nullptr);
        } else {
          fn_rows(k, a.data(), rows.data(), 0, c.data(), wide->nr);
        }
      }
    };
    const double rate = best_rate(work, 2.0 * mr * wide->nr * static_cast<double>(k), seconds);
    g_sink = c[0];
    return rate;
  }
  if (variant == "taps") {
    // MicrokernelTapsFn over 9 taps of K = k each (a 3x3 conv's call): the
    // taps share the A rows (L1), B is the 9k x NR panel (L2 beyond k ~ 50).
    TORCH_CHECK_VALUE(wide->taps != nullptr, "microkernel_gflops: the ", isa, " microkernel has no taps variant");
    constexpr int64_t kTaps = 9;
    std::vector<float> a(static_cast<size_t>(wide->mr * k), 1e-3f);
    std::vector<float> b(static_cast<size_t>(kTaps * k * wide->nr), 1e-3f);
    std::vector<float> c(static_cast<size_t>(wide->mr * wide->nr), 0.0f);
    std::vector<const float*> rows(static_cast<size_t>(kTaps * wide->mr));
    for (int64_t t = 0; t < kTaps; ++t)
      for (int i = 0; i < wide->mr; ++i) rows[t * wide->mr + i] = a.data() + i * k;
    auto work = [&](int64_t calls) {
      for (int64_t j = 0; j < calls; ++j)
        wide->taps(kTaps, k, rows.data(), 1, b.data(), c.data(), wide->nr, true, nullptr);
    };
    const double rate = best_rate(work, 2.0 * wide->mr * wide->nr * kTaps * static_cast<double>(k), seconds);
    g_sink = c[0];
    return rate;
  }
  const Microkernel* picked = variant == "narrow" ? wide->narrow : variant == "three" ? wide->three : wide;
  TORCH_CHECK_VALUE(picked != nullptr, "microkernel_gflops: the ", isa, " microkernel has no ", variant,
                    " variant");
  const Microkernel& uk = *picked;
  // A: MR rows of K floats; B: K x NR packed; C: MR x NR. Small values keep
  // the accumulated C finite over billions of steps.
  std::vector<float> a(static_cast<size_t>(uk.mr * k), 1e-3f), b(static_cast<size_t>(k * uk.nr), 1e-3f),
      c(static_cast<size_t>(uk.mr * uk.nr), 0.0f);
  std::vector<const float*> rows(static_cast<size_t>(uk.mr));
  for (int i = 0; i < uk.mr; ++i) rows[i] = a.data() + i * k;
  auto work = [&](int64_t calls) {
    for (int64_t j = 0; j < calls; ++j) uk.fn(k, rows.data(), 1, b.data(), c.data(), uk.nr, true, nullptr);
  };
  const double rate = best_rate(work, 2.0 * uk.mr * uk.nr * static_cast<double>(k), seconds);
  g_sink = c[0];
  return rate;
}

}  // namespace cpu
}  // namespace hsv
