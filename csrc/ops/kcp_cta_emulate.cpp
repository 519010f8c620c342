#include "kcp_cta_emulate.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstring>
#include <algorithm>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "kcp_cta_plan.h"
#include "kcp_cta_program.h"

namespace hsv {
namespace {

constexpr int64_t kH100Smem = 227 * 1024;
constexpr int64_t kH100Sms = 132;

// The executor of kcp_cta_program.h on the host. Phases are queued and run at
// the next barrier; with `reverse`, the queued phases run last first and each
// phase's items last first, so a missing barrier between two dependent phases,
// or an item depending on another item of its phase, changes the answer.
struct HostExec {
  bool reverse = false;
  // The warps' fp32 staging tiles, which the device overwrites on every mma_store: here filled with NaN
  // there, so a staging area that overlapped live data would show in the answer.
  unsigned char* stage = nullptr;
  // The spans a tile may touch: this CTA's shared memory, then the packed factors.
  std::vector<std::pair<const char*, const char*>> spans;
  std::vector<std::function<void()>> queued;

  template <typename F>
  void threads(int count, F f) {
    queued.emplace_back([this, count, f] {
      if (reverse) {
        for (int i = count - 1; i >= 0; --i) f(i);
      } else {
        for (int i = 0; i < count; ++i) f(i);
      }
    });
  }
  template <typename F>
  void warps(int count, F f) {
    threads(count, f);
  }
  void sync() {
    if (reverse) std::reverse(queued.begin(), queued.end());
    for (auto& phase : queued) phase();
    queued.clear();
  }

  void check(const void* ptr, int64_t bytes, const char* what) const {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % 32 == 0, "kcp emulator: ", what, " tile is not 32-byte aligned");
    const char* lo = static_cast<const char*>(ptr);
    for (const auto& s : spans)
      if (lo >= s.first && lo + bytes <= s.second) return;
    TORCH_CHECK(false, "kcp emulator: ", what, " tile (", bytes, " bytes) is outside shared memory and the factors");
  }

  // The operand-dtype tiles: A (16 x K) row-major, B (K x 16) row- or column-major.
  template <bool BCol, typename S>
  void tile(const S* a, int lda, const S* b, int ldb, int k, float (&acc)[16][16]) const {
    TORCH_CHECK(lda % 8 == 0 && ldb % 8 == 0 && k % 16 == 0 && k > 0, "kcp emulator: lda ", lda, ", ldb ", ldb,
                ", K ", k, " (leading dimensions must be multiples of 8, K of 16)");
    check(a, (int64_t{15} * lda + k) * sizeof(S), "A");
    check(b, (BCol ? int64_t{15} * ldb + k : int64_t{k - 1} * ldb + 16) * sizeof(S), "B");
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        float s = acc[i][j];
        for (int kk = 0; kk < k; ++kk)
          s += static_cast<float>(a[i * lda + kk]) * static_cast<float>(BCol ? b[j * ldb + kk] : b[kk * ldb + j]);
        acc[i][j] = s;
      }
  }

  template <bool BCol, typename S>
  void mma_store(const S* a, int lda, const S* b, int ldb, int k, S* d, int ldd) {
    TORCH_CHECK(ldd % 8 == 0, "kcp emulator: ldd ", ldd, " is not a multiple of 8");
    check(d, (int64_t{15} * ldd + 16) * sizeof(S), "D");
    float acc[16][16] = {};
    tile<BCol>(a, lda, b, ldb, k, acc);
    std::memset(stage, 0xFF, kKcpStageBytes);
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) d[i * ldd + j] = static_cast<S>(acc[i][j]);
  }

  template <typename S>
  void mma_accum(const S* a, int lda, const S* b, int ldb, int k, float* c, int ldc) {
    TORCH_CHECK(ldc % 4 == 0, "kcp emulator: ldc ", ldc, " is not a multiple of 4");
    check(c, (int64_t{15} * ldc + 16) * 4, "C");
    float acc[16][16];
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) acc[i][j] = c[i * ldc + j];
    tile<false>(a, lda, b, ldb, k, acc);
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) c[i * ldc + j] = acc[i][j];
  }
};

template <typename S>
void run_all(const KcpParams& p, const std::vector<at::Tensor>& keep, bool reverse) {
  const long long ctas = kcp_cta_count(p);
  std::vector<std::pair<const char*, const char*>> factor_spans;
  for (const auto& t : keep) {
    const char* lo = static_cast<const char*>(t.data_ptr());
    factor_spans.emplace_back(lo, lo + t.nbytes());
  }
  at::parallel_for(0, ctas, 1, [&](int64_t begin, int64_t end) {
    // past the launch's shared memory, as many bytes again that must stay untouched: a layout that overran
    // its allocation shows as a failed check here rather than as a write into the emulator's heap
    const size_t guard = std::max<size_t>(4096, p.smem_bytes);
    std::vector<unsigned char> buf(p.smem_bytes + guard + 128);
    // 128-byte aligned like the kernel's dynamic shared memory
    unsigned char* smem = buf.data() + (128 - reinterpret_cast<uintptr_t>(buf.data()) % 128) % 128;
    HostExec ex;
    ex.reverse = reverse;
    ex.stage = smem + p.off_stage;
    ex.spans.emplace_back(reinterpret_cast<const char*>(smem), reinterpret_cast<const char*>(smem) + p.smem_bytes);
    ex.spans.insert(ex.spans.end(), factor_spans.begin(), factor_spans.end());
    for (int64_t cta = begin; cta < end; ++cta) {
      std::memset(smem, 0xFF, p.smem_bytes + guard);  // NaN in fp16, bf16 and fp32
      kcp_cta_run<S>(p, cta, smem, ex);
      TORCH_CHECK(ex.queued.empty(), "kcp emulator: the CTA program ended without a barrier after its last phase");
      for (size_t i = 0; i < guard; ++i)
        TORCH_CHECK(smem[p.smem_bytes + i] == 0xFF, "kcp emulator: CTA ", cta, " wrote past its ", p.smem_bytes,
                    " bytes of shared memory");
    }
  });
  if (p.splits > 1) {  // the second launch: every output element from the splits' partial sums
    at::parallel_for(0, p.ws_split, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) kcp_cta_finalize<S>(p, i);
    });
  }
}

Plan kcp_plan(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  return make_plan(input, factors, bias, stride, padding, dilation, 1, "kcp");
}

}  // namespace

at::Tensor kcp_cta_emulate(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t tile_h,
                           int64_t tile_w, int64_t nb, int64_t splits, bool reverse) {
  TORCH_CHECK_VALUE(input.device().is_cpu(), "kcp_cta_emulate: input must be a CPU tensor, got ", input.device());
  const Plan plan = kcp_plan(input, factors, bias, stride, padding, dilation);
  KcpParams p;
  std::string why;
  const KcpTile force{static_cast<int>(tile_h), static_cast<int>(tile_w), static_cast<int>(nb),
                      static_cast<int>(splits)};
  const bool forced = tile_h > 0 || tile_w > 0 || nb > 0 || splits > 0;
  TORCH_CHECK_VALUE(kcp_cta_geometry(input, factors, plan, kH100Smem, kH100Sms, p, &why, forced ? &force : nullptr),
                    "kcp_cta_emulate: the kernel does not run these arguments: ", why);
  at::Tensor out = at::empty(plan.out_shape, input.options().memory_format(output_memory_format(input)));
  if (out.numel() == 0) return out;
  const std::vector<at::Tensor> keep = kcp_cta_pack(factors, bias, p, /*cache=*/false);
  kcp_cta_bind(input, out, p);
  // NaN: a workspace element no split wrote shows in the output
  const at::Tensor ws = kcp_cta_workspace(input, p);
  if (ws.defined()) ws.fill_(std::numeric_limits<float>::quiet_NaN());
  if (input.scalar_type() == at::kHalf) {
    run_all<c10::Half>(p, keep, reverse);
  } else {
    run_all<c10::BFloat16>(p, keep, reverse);
  }
  return out;
}

std::vector<int64_t> kcp_cta_tile(const at::Tensor& input, at::TensorList factors, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t smem_limit, int64_t sms) {
  const Plan plan = kcp_plan(input, factors, c10::nullopt, stride, padding, dilation);
  KcpParams p;
  std::string why;
  TORCH_CHECK_VALUE(kcp_cta_geometry(input, factors, plan, smem_limit, sms, p, &why),
                    "kcp_cta_tile: the kernel does not run these arguments: ", why);
  return {p.tile_h, p.tile_w, p.nb, p.splits, p.smem_bytes};
}

}  // namespace hsv
