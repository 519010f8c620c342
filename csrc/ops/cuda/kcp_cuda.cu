// The fused kcp kernel: one CTA of 256 threads runs kcp_cta_run (../kcp_cta_program.h)
// for one tile of output pixels, with the executor below: items spread over the
// threads, 16 x 16 output tiles over the warps, each tile on the tensor cores
// through WMMA (m16n16k16, fp32 accumulators), written back through a per-warp
// fp32 staging tile where the result is an operand-dtype intermediate.
// TODO (after GPU verification): mma.sync fragments kept in registers between
// G4 and G5, cp.async for the input chunks, larger tiles where shared memory allows.
#include "kcp_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

#include "../kcp_cta_plan.h"
#include "../kcp_cta_program.h"
#include "cuda_impl.h"
#include "wmma_tiles.cuh"

namespace hsv {
namespace cuda {
namespace {

using namespace nvcuda;

template <typename S>
struct WmmaElem;
template <>
struct WmmaElem<c10::Half> {
  using type = __half;
};
template <>
struct WmmaElem<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// The device executor of kcp_cta_program.h.
struct DeviceExec {
  float* stage;  // this warp's 16 x 16 fp32 staging tile

  template <typename F>
  __device__ __forceinline__ void threads(int count, F&& f) {
    for (int i = threadIdx.x; i < count; i += kKcpThreads) f(i);
  }
  // t depends only on the warp, so every lane of a warp takes the same tiles (WMMA is warp-collective)
  template <typename F>
  __device__ __forceinline__ void warps(int count, F&& f) {
    for (int t = threadIdx.x / 32; t < count; t += kKcpWarps) f(t);
  }
  __device__ __forceinline__ void sync() { __syncthreads(); }

  template <bool BCol, typename E, typename Acc>
  __device__ __forceinline__ void mma_loop(Acc& acc, const E* a, int lda, const E* b, int ldb, int k) {
    using BLayout = std::conditional_t<BCol, wmma::col_major, wmma::row_major>;
    for (int k0 = 0; k0 < k; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, BLayout> fb;
      wmma::load_matrix_sync(fa, a + k0, lda);
      wmma::load_matrix_sync(fb, BCol ? b + k0 : b + static_cast<long long>(k0) * ldb, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
  }

  template <bool BCol, typename S>
  __device__ __forceinline__ void mma_store(const S* a, int lda, const S* b, int ldb, int k, S* d, int ldd) {
    using E = typename WmmaElem<S>::type;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    mma_loop<BCol>(acc, reinterpret_cast<const E*>(a), lda, reinterpret_cast<const E*>(b), ldb, k);
    wmma::store_matrix_sync(stage, acc, 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = threadIdx.x % 32; e < 256; e += 32) d[(e / 16) * ldd + e % 16] = static_cast<S>(stage[e]);
    __syncwarp();  // the staging tile is reused by this warp's next tile
  }

  template <typename S>
  __device__ __forceinline__ void mma_accum(const S* a, int lda, const S* b, int ldb, int k, float* c, int ldc) {
    using E = typename WmmaElem<S>::type;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major);
    mma_loop<false>(acc, reinterpret_cast<const E*>(a), lda, reinterpret_cast<const E*>(b), ldb, k);
    wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
  }
};

template <typename S>
__global__ void __launch_bounds__(kKcpThreads) kcp_kernel(const KcpParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched: kcp_supports requires compute capability 8.0 (bf16 WMMA)
#else
  extern __shared__ __align__(128) unsigned char smem[];
  DeviceExec ex{reinterpret_cast<float*>(smem + p.off_stage) + (threadIdx.x / 32) * 256};
  kcp_cta_run<S>(p, blockIdx.x, smem, ex);
#endif
}

std::atomic<int64_t> last_tile_h{0}, last_tile_w{0}, last_nb{0}, last_splits{0}, last_smem{0};

// With splits: every output element from the splits' partial sums in the workspace.
template <typename S>
__global__ void __launch_bounds__(256) kcp_finalize_kernel(const KcpParams p) {
  const long long n = p.ws_split;  // batch x cout x ho x wo
  for (long long i = blockIdx.x * 256LL + threadIdx.x; i < n; i += 256LL * gridDim.x) kcp_cta_finalize<S>(p, i);
}

template <typename S>
void launch(const KcpParams& p, long long ctas, int sms, cudaStream_t stream) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  tiles::allow_max_dynamic_smem(reinterpret_cast<const void*>(&kcp_kernel<S>), device);
  kcp_kernel<S><<<static_cast<unsigned>(ctas), kKcpThreads, p.smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.splits > 1) {
    const long long blocks = std::min<long long>((p.ws_split + 255) / 256, 8LL * sms);
    kcp_finalize_kernel<S><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

bool kcp_supports(const at::Tensor& input, at::TensorList factors, const Plan& plan, const std::string& kind,
                  KcpParams* geometry, std::string* reason) {
  if (kind != "kcp" || !input.is_cuda()) {
    if (reason) *reason = kind != "kcp" ? "not kind kcp" : "input is not on a CUDA device";
    return false;
  }
  const tiles::DeviceInfo dev = tiles::device_info(input.device().index());
  if (dev.major < 8) {
    if (reason) *reason = "needs compute capability 8.0 or newer";
    return false;
  }
  return kcp_cta_geometry(input, factors, plan, dev.smem_optin, dev.sms, *geometry, reason);
}

at::Tensor kcp_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                       const Plan& plan, KcpParams p, bool cache) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(plan.out_shape, input.options().memory_format(output_memory_format(input)));
  if (out.numel() == 0) return out;
  const tiles::DeviceInfo dev = tiles::device_info(input.device().index());
  const std::vector<at::Tensor> keep = kcp_cta_pack(factors, bias, p, cache);
  kcp_cta_bind(input, out, p);
  const at::Tensor ws = kcp_cta_workspace(input, p);  // the splits' partial sums; kept until the launches are queued
  const long long ctas = kcp_cta_count(p);
  TORCH_CHECK(ctas <= std::numeric_limits<int>::max(), "hsv::conv2d(kind='kcp'): ", ctas, " tiles exceed the grid");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (input.scalar_type() == at::kHalf) {
    launch<c10::Half>(p, ctas, dev.sms, stream);
  } else {
    launch<c10::BFloat16>(p, ctas, dev.sms, stream);
  }
  count_fused_launch();
  count_kcp_launch();
  last_tile_h.store(p.tile_h);
  last_tile_w.store(p.tile_w);
  last_nb.store(p.nb);
  last_splits.store(p.splits);
  last_smem.store(p.smem_bytes);
  return out;
}

std::vector<int64_t> kcp_last_config() {
  return {last_tile_h.load(), last_tile_w.load(), last_nb.load(), last_splits.load(), last_smem.load()};
}

}  // namespace cuda
}  // namespace hsv
