// wgmma (sm_90a) variant of the fused two-stage forward y = bias + U @ conv(x, V)
// for fp16/bf16 channels_last inputs (see two_stage_wgmma.h).
//
// Why a third NHWC kernel: the mma.sync kernel (two_stage_mma.cu) reached about
// 236 TFLOP/s on its first GEMM at vgg16.features.19 (batch 32, H100), where
// cuDNN's dense conv ran at about 710, and on small grids a K step cost ~950
// cycles whatever its MMA count: every warp waits for its own ldmatrix and
// mma.sync results. Here a warpgroup (4 warps) issues m64nRPk16 MMAs that read
// both operands straight from shared memory and run asynchronously, so the
// next step's copies are issued while the tensor cores work, and no register
// or issue slot goes to operand fragments.
//   * A CTA holds WG warpgroups, each owning 64 output pixels and all rp ranks.
//   * Stage 1 per K step (KS = 64 or 32 channels of one tap): the gathered input
//     tile (pixels x KS) and the Vp tile (rp x KS), K-major in the 128-byte
//     swizzle (wgmma_ops.cuh), brought in by 16-byte cp.async copies, zero-filled
//     for padding taps and pixels past the end, 4 stages deep with 2 steps of
//     copies in flight, one step of MMAs in flight, and one barrier per step.
//   * The m64nN accumulator layout per warp is the mma.sync m16n8 one, so the
//     intermediate is rounded to the input dtype (as the composite chain rounds
//     it) and fed to stage 2 as register A fragments, never leaving the SM.
//   * Split-K in a cluster and the output path (64-channel chunks of Up through
//     shared memory, rows staged per warp and written as 16-byte stores) follow
//     the mma kernel.
#include "two_stage_wgmma.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <ATen/ops/empty.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "../env_choice.h"
#include "cuda_impl.h"
#include "wgmma_ops.cuh"
#include "wmma_tiles.cuh"

namespace hsv {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kStages = 4;           // cp.async pipeline depth (2 steps of copies ahead)
constexpr int kCoChunk = 64;         // output channels per stage-2 chunk
constexpr int kLdOut = kCoChunk + 8; // staging rows of 144 bytes: a warp's 16-byte reads hit distinct banks
constexpr int kMaxCluster = 8;       // the portable cluster size limit
constexpr int kRowBytes = 128;       // one swizzled row: 64 16-bit elements

struct WgParams {
  const void* x;         // (N, Cin, H, W) with unit channel stride
  long long sn, sh, sw;  // its other strides (elements, multiples of 8)
  int h, w, cin, kw;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int ho, wo;
  long long pixels;      // N * Ho * Wo
  int k;                 // kh * kw * Cin (a multiple of the K step)
  int cout;              // a multiple of 8
  int cout_pad;          // a multiple of kCoChunk
  const void* vp;        // (rp, k)
  const void* up;        // (cout_pad, rp)
  const float* bias;     // cout floats or nullptr
  void* out;             // channels_last contiguous: pixel p, channel c at p * cout + c
  const void* residual;  // conv2d_epilogue: added to out (its layout), or nullptr
  bool relu;             // conv2d_epilogue: ReLU after the residual
  int steps_per_split;   // K steps per CTA of a cluster
};

constexpr int cmax(int a, int b) { return a > b ? a : b; }

// Shared memory (from a 1024-byte aligned base), one region reused three ways:
//   stage 1   kStages x {input tile (64 WG rows), Vp tile (RP rows)}, 128-byte
//             rows (KS = 32 fills their first half)
//   split-K   the fp32 partial intermediate in fragment order (64 WG x RP)
//   stage 2   {Up chunk x 2 (64 rows x RP, in 64-wide column blocks)} + per-warp
//             output staging (16 x 64)
// Every tile size is a multiple of 1024 bytes, so every tile base stays aligned.
template <int RP, int WG>
struct WgLayout {
  static constexpr int kThreads = 128 * WG;
  static constexpr int kTileM = 64 * WG;
  static constexpr int kA = kTileM * kRowBytes;
  static constexpr int kV = RP * kRowBytes;
  static constexpr int kStage = kA + kV;
  static constexpr int kPipe = kStages * kStage;
  static constexpr int kPartial = kTileM * RP * 4;
  static constexpr int kUBlock = kCoChunk * kRowBytes;  // one 64-wide column block of an Up chunk
  static constexpr int kU = ((RP + 63) / 64) * kUBlock;
  static constexpr int kOutWarp = 16 * kLdOut * 2;
  static constexpr int kStage2 = 2 * kU + (kThreads / 32) * kOutWarp;
  // + 1024: room to align the dynamic shared memory's base
  static constexpr int bytes(bool split) { return 1024 + cmax(kPipe, cmax(split ? kPartial : 0, kStage2)); }
};

#if HSV_WGMMA_DEVICE
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Two floats as two 16-bit values in one register, the first in the low half.
__device__ __forceinline__ unsigned pack2(float lo, float hi, __half*) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ unsigned pack2(float lo, float hi, __nv_bfloat16*) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
#endif

template <typename S, int RP, int KS, int WG>
__global__ void __launch_bounds__(128 * WG) wgmma_kernel(const WgParams p) {
#if !HSV_WGMMA_DEVICE
  __trap();  // never launched: the host side requires the sm_90a build and a compute capability 9.0 device
#else
  using L = WgLayout<RP, WG>;
  using Mma1 = wgmma::Wgmma<RP, S>;
  using Mma2 = wgmma::Wgmma<kCoChunk, S>;
  constexpr int kThreads = L::kThreads;
  constexpr int kKk = RP / 16;                      // k16 rank steps (stage 2)
  constexpr int kRowPieces = KS / 8;                // 16-byte pieces per row and step
  constexpr int kRowsPerPass = kThreads / kRowPieces;
  constexpr int kPieces = L::kTileM / kRowsPerPass; // gathered pixels per thread and step
  constexpr int kVPieces = (RP + kRowsPerPass - 1) / kRowsPerPass;
  static_assert(kRowsPerPass % 8 == 0, "a thread's rows share one swizzle phase");
  S* const tag = nullptr;

  extern __shared__ unsigned char smem_raw[];
  const unsigned raw0 = smem_addr(smem_raw);
  unsigned char* const smem = smem_raw + ((1024 - (raw0 & 1023)) & 1023);
  const unsigned smem0 = smem_addr(smem);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = warp / 4;
  const int g = lane / 4, t4 = lane % 4;
  cg::cluster_group cluster = cg::this_cluster();
  const int splits = static_cast<int>(cluster.num_blocks());
  const int split = static_cast<int>(cluster.block_rank());
  const long long p0 = (blockIdx.x / splits) * static_cast<long long>(L::kTileM);
  const S* x = static_cast<const S*>(p.x);
  const S* vp = static_cast<const S*>(p.vp);
  const S* up = static_cast<const S*>(p.up);

  // This thread copies 16-byte piece `piece` of rows row0 + kRowsPerPass j of the
  // input tile (pixels) and of the Vp tile (ranks). Per pixel: the offset of the
  // top-left input position of its window (may lie in the padding) and that
  // position; a pixel past the end gets a row no tap can bring in range.
  const int piece = tid % kRowPieces, row0 = tid / kRowPieces;
  const int dst0 = wgmma::swizzle128(row0, piece);  // + kRowsPerPass * 128 j: the swizzle phase is row0 % 8
  long long g_off[kPieces];
  int g_iy[kPieces], g_ix[kPieces];
#pragma unroll
  for (int j = 0; j < kPieces; ++j) {
    const long long pix = p0 + row0 + kRowsPerPass * j;
    g_off[j] = 0;
    g_iy[j] = -(1 << 30);
    g_ix[j] = 0;
    if (pix < p.pixels) {
      int n;
      tiles::pixel_origin(p, pix, n, g_iy[j], g_ix[j]);
      g_off[j] = n * p.sn + static_cast<long long>(g_iy[j]) * p.sh + static_cast<long long>(g_ix[j]) * p.sw +
                 piece * 8;
    }
  }
  const long long v_src0 = static_cast<long long>(row0) * p.k + piece * 8;

  const int csteps = p.cin / KS;
  const int k_steps = p.k / KS;
  const int s_begin = split * p.steps_per_split;
  const int nsteps = max(0, min(k_steps, s_begin + p.steps_per_split) - s_begin);

  // The next step to issue, tap-major, as running (channel, tap) counters (no
  // integer division per step): channel c0, tap column tx, the tap's offsets dy,
  // dx in input rows and columns, and delta = dy * sh + dx * sw + c0.
  const int tap0 = s_begin / csteps, ty0 = tap0 / p.kw;
  int nx_c0 = (s_begin - tap0 * csteps) * KS;
  int nx_tx = tap0 - ty0 * p.kw;
  int nx_dy = ty0 * p.dil_h, nx_dx = nx_tx * p.dil_w;
  long long nx_delta = nx_dy * p.sh + nx_dx * p.sw + nx_c0;
  const S* nx_v = vp + static_cast<long long>(s_begin) * KS;
  const long long next_tap_col = p.dil_w * p.sw - p.cin;  // delta's change when the tap moves one column

  // The next step's operands into pipeline stage `stage` (cp.async, not waited for).
  auto issue = [&](int stage) {
    unsigned char* const a = smem + stage * L::kStage;
#pragma unroll
    for (int j = 0; j < kPieces; ++j) {
      const int iy = g_iy[j] + nx_dy, ix = g_ix[j] + nx_dx;
      const bool ok = static_cast<unsigned>(iy) < static_cast<unsigned>(p.h) &&
                      static_cast<unsigned>(ix) < static_cast<unsigned>(p.w);
      // a zero-filled copy reads nothing, but its address must still be valid: x
      tiles::cp_async16_zfill(a + dst0 + kRowsPerPass * kRowBytes * j, ok ? x + (g_off[j] + nx_delta) : x, ok);
    }
#pragma unroll
    for (int j = 0; j < kVPieces; ++j) {
      if (RP % kRowsPerPass == 0 || row0 + kRowsPerPass * j < RP) {
        tiles::cp_async16(a + L::kA + dst0 + kRowsPerPass * kRowBytes * j,
                          nx_v + v_src0 + static_cast<long long>(kRowsPerPass) * j * p.k);
      }
    }
    nx_v += KS;
    nx_c0 += KS;
    nx_delta += KS;
    if (nx_c0 == p.cin) {
      nx_c0 = 0;
      nx_dx += p.dil_w;
      nx_delta += next_tap_col;
      if (++nx_tx == p.kw) {
        nx_tx = 0;
        nx_dx = 0;
        nx_dy += p.dil_h;
        nx_delta = nx_dy * p.sh;
      }
    }
  };

  // Stage 1: acc = this warpgroup's 64 x RP tile of T^T (pixels x ranks). Every
  // thread commits one copy group per step (empty past the end), so the
  // wait_group counts line up. Step s's copies go to stage s % kStages, issued
  // during step s - 2, after its barrier. The stage's previous reader was step
  // s - 4, and every warpgroup waited for those MMAs during step s - 3 (each
  // waits for all but its latest group), before arriving at that barrier.
  float acc[RP / 2];
#pragma unroll
  for (int i = 0; i < RP / 2; ++i) acc[i] = 0.0f;
#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) {
    if (s < nsteps) issue(s);
    tiles::cp_async_commit();
  }
  const unsigned a_wg = wg * 64 * kRowBytes;  // this warpgroup's rows of the input tile
  for (int s = 0; s < nsteps; ++s) {
    tiles::cp_async_wait<kStages - 3>();  // step s has landed (this thread's copies) ...
    wgmma::fence_proxy_async();           // ... is visible to the tensor cores ...
    __syncthreads();                      // ... everyone's, and stage (s + 2) % kStages is free
    const unsigned st = smem0 + (s % kStages) * L::kStage;
    wgmma::fence_regs(acc);
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < KS / 16; ++kk) {
      Mma1::ss(acc, wgmma::desc_sw128(st + a_wg + kk * 32), wgmma::desc_sw128(st + L::kA + kk * 32), 1);
    }
    wgmma::commit();
    // the copies go out while the MMAs run
    if (s + kStages - 2 < nsteps) issue((s + kStages - 2) % kStages);
    tiles::cp_async_commit();
    wgmma::wait<1>();  // step s - 1's MMAs are done: its stage may be refilled after the next barrier
    wgmma::fence_regs(acc);
  }
  wgmma::wait<0>();
  wgmma::fence_regs(acc);
  tiles::cp_async_wait<0>();
  __syncthreads();  // the pipeline's memory is free

  // Split-K: the cluster's partials summed through distributed shared memory,
  // every CTA adding them in rank order, so all hold bit-identical sums.
  if (splits > 1) {
    float4* part = reinterpret_cast<float4*>(smem);
#pragma unroll
    for (int nj = 0; nj < RP / 8; ++nj) {
      part[nj * kThreads + tid] = make_float4(acc[4 * nj], acc[4 * nj + 1], acc[4 * nj + 2], acc[4 * nj + 3]);
    }
    cluster.sync();  // every partial written (and visible cluster-wide)
#pragma unroll
    for (int i = 0; i < RP / 2; ++i) acc[i] = 0.0f;
    for (int r = 0; r < splits; ++r) {
      const float4* src = cluster.map_shared_rank(part, r);
#pragma unroll
      for (int nj = 0; nj < RP / 8; ++nj) {
        const float4 v = src[nj * kThreads + tid];
        acc[4 * nj] += v.x;
        acc[4 * nj + 1] += v.y;
        acc[4 * nj + 2] += v.z;
        acc[4 * nj + 3] += v.w;
      }
    }
    cluster.sync();  // nobody reads a partial any more: the memory is free again
  }

  // T^T rounded to the input dtype as stage 2's A fragments: the m16k16 tile of
  // ranks 16 kk.. is the accumulators of rank tiles 2 kk and 2 kk + 1.
  unsigned ta[kKk][4];
#pragma unroll
  for (int kk = 0; kk < kKk; ++kk) {
    ta[kk][0] = pack2(acc[8 * kk], acc[8 * kk + 1], tag);
    ta[kk][1] = pack2(acc[8 * kk + 2], acc[8 * kk + 3], tag);
    ta[kk][2] = pack2(acc[8 * kk + 4], acc[8 * kk + 5], tag);
    ta[kk][3] = pack2(acc[8 * kk + 6], acc[8 * kk + 7], tag);
  }

  // Stage 2: output channels in chunks of 64; this CTA takes chunks split,
  // split + splits, ... Up rows (B operand, channels x ranks, K-major).
  S* const out_s = reinterpret_cast<S*>(smem + 2 * L::kU + warp * L::kOutWarp);
  constexpr int kUPieces = RP / 8;  // 16-byte pieces per Up row
  auto issue_u = [&](int chunk, int buf) {
    unsigned char* dst = smem + buf * L::kU;
    const S* src = up + static_cast<long long>(chunk) * kCoChunk * RP;
#pragma unroll
    for (int i = tid; i < kCoChunk * kUPieces; i += kThreads) {
      const int row = i / kUPieces, pc = i % kUPieces;
      tiles::cp_async16(dst + (pc / 8) * L::kUBlock + wgmma::swizzle128(row, pc % 8), src + row * RP + pc * 8);
    }
  };
  const int chunks = p.cout_pad / kCoChunk;
  if (split < chunks) issue_u(split, 0);
  tiles::cp_async_commit();
  int it = 0;
  for (int c = split; c < chunks; c += splits, ++it) {
    if (c + splits < chunks) {
      issue_u(c + splits, (it + 1) & 1);  // that buffer's last MMAs were waited for before the last barrier
      tiles::cp_async_commit();
      tiles::cp_async_wait<1>();
    } else {
      tiles::cp_async_wait<0>();
    }
    wgmma::fence_proxy_async();
    __syncthreads();
    const unsigned ub = smem0 + (it & 1) * L::kU;
    float o[kCoChunk / 2];
#pragma unroll
    for (int i = 0; i < kCoChunk / 2; ++i) o[i] = 0.0f;
    wgmma::fence_regs(o);
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < kKk; ++kk) {
      Mma2::rs(o, ta[kk], wgmma::desc_sw128(ub + (kk / 4) * L::kUBlock + (kk % 4) * 32), 1);
    }
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_regs(o);
    // bias, round, into the warp's staging rows (its 16 pixels) ...
#pragma unroll
    for (int nj = 0; nj < kCoChunk / 8; ++nj) {
      const int col = nj * 8 + 2 * t4, co = c * kCoChunk + col;
      const float b0 = (p.bias != nullptr && co < p.cout) ? p.bias[co] : 0.0f;
      const float b1 = (p.bias != nullptr && co + 1 < p.cout) ? p.bias[co + 1] : 0.0f;
      *reinterpret_cast<unsigned*>(out_s + g * kLdOut + col) = pack2(o[4 * nj] + b0, o[4 * nj + 1] + b1, tag);
      *reinterpret_cast<unsigned*>(out_s + (g + 8) * kLdOut + col) =
          pack2(o[4 * nj + 2] + b0, o[4 * nj + 3] + b1, tag);
    }
    __syncwarp();
    // ... and out as 16-byte stores: 8 lanes cover one pixel's 64 channels.
#pragma unroll
    for (int e = lane; e < 16 * (kCoChunk / 8); e += 32) {
      const int row = e / (kCoChunk / 8), pc = e % (kCoChunk / 8);
      const long long pix = p0 + warp * 16 + row;
      const int co = c * kCoChunk + pc * 8;
      if (pix < p.pixels && co < p.cout) {
        const long long at = pix * p.cout + co;
        const S* res = p.residual != nullptr ? static_cast<const S*>(p.residual) + at : nullptr;
        *reinterpret_cast<uint4*>(static_cast<S*>(p.out) + at) =
            tiles::tail8<S>(*reinterpret_cast<const uint4*>(out_s + row * kLdOut + pc * 8), res, p.relu);
      }
    }
    __syncthreads();  // the Up buffer (refilled next chunk) and the staging rows are free
  }
#endif
}

// ---------------------------------------------------------------------------
// Host side.

using KernelFn = void (*)(const WgParams);

struct Variant {
  KernelFn fn = nullptr;
  int bytes_single = 0;
  int bytes_split = 0;
};

template <typename S, int RP, int KS, int WG>
Variant variant() {
  using L = WgLayout<RP, WG>;
  return Variant{&wgmma_kernel<S, RP, KS, WG>, L::bytes(false), L::bytes(true)};
}

template <typename S, int RP>
Variant pick_ks_wg(int ks, int wg) {
  if (wg == 2) return ks == 64 ? variant<S, RP, 64, 2>() : variant<S, RP, 32, 2>();
  return ks == 64 ? variant<S, RP, 64, 1>() : variant<S, RP, 32, 1>();
}

template <typename S>
Variant pick(int64_t rp, int ks, int wg) {
  switch (rp) {
    case 16: return pick_ks_wg<S, 16>(ks, wg);
    case 32: return pick_ks_wg<S, 32>(ks, wg);
    case 64: return pick_ks_wg<S, 64>(ks, wg);
    default: return pick_ks_wg<S, 128>(ks, wg);
  }
}

std::atomic<int64_t> last_wg{0}, last_splits{0}, last_tiles{0}, last_ks{0};

}  // namespace

bool wgmma_built() {
#ifdef HSV_SM90A
  return true;
#else
  return false;
#endif
}

std::vector<int64_t> wgmma_last_config() {
  return {last_wg.load(), last_splits.load(), last_tiles.load(), last_ks.load()};
}

bool wgmma_selected(const at::Tensor& input) {
  if (nhwc_kernel_from_env() != NhwcKernel::Wgmma) return false;
  TORCH_CHECK_VALUE(wgmma_built(), "hsv::conv2d: HSV_CUDA_NHWC=wgmma, but this extension has no sm_90a code ",
                    "(build with 9.0a in TORCH_CUDA_ARCH_LIST; setup.py turns 9.0 into 9.0a unless HSV_NO_SM90A=1)");
  const int major = tiles::device_info(input.device().index()).major;
  TORCH_CHECK_VALUE(major == 9, "hsv::conv2d: HSV_CUDA_NHWC=wgmma needs a compute capability 9.x device (sm_90a), ",
                    "this one is ", major, ".x");
  return true;
}

at::Tensor wgmma_forward(const at::Tensor& input, const at::Tensor& vp, const at::Tensor& up,
                         const at::Tensor& bias_f, const Plan& plan, int64_t kh, int64_t kw, int64_t cout,
                         const Tail& tail) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(plan.out_shape, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t n = input.size(0);
  if (n == 0) return out;
  TORCH_CHECK(out.is_contiguous(at::MemoryFormat::ChannelsLast), "hsv::conv2d: wgmma kernel: output layout");
  const int64_t cin = input.size(1), rp = vp.size(0), k = kh * kw * cin;
  tiles::check_packed_factors(vp, up, k, kCoChunk, "wgmma kernel");
  WgParams p{};
  tiles::set_two_stage_operands(p, input, vp, up, bias_f, out, plan, k, kw, cout);
  const bool tail_in_stores = tail.fits_stores_of(out);
  if (tail_in_stores) tiles::set_tail(p, tail.residual_data(), tail.relu);

  const bool half = input.scalar_type() == at::kHalf;
  const int device = input.device().index();
  const int64_t sms = tiles::device_info(device).sms;
  const int ks = mma_k_step(cin);
  // Warpgroups per CTA: two (128-pixel tiles, each Vp tile serving twice the
  // pixels) where that still makes half as many tiles as SMs, else one: the
  // mma kernel's rule for its 128- and 64-pixel tiles, to be tuned on an H100.
  auto tiles_for = [&](int wg) -> int64_t { return (p.pixels + 64 * wg - 1) / (64 * wg); };
  int wg = static_cast<int>(env_choice("HSV_CUDA_WGMMA_WG", {"auto", "1", "2"}));  // the position is the value
  if (wg == 0) wg = tiles_for(2) * 2 >= sms ? 2 : 1;
  const Variant v = half ? pick<__half>(rp, ks, wg) : pick<__nv_bfloat16>(rp, ks, wg);
  const int64_t tiles = tiles_for(wg);
  // Split-K as in the mma kernel: the smallest power of two <= 4 that covers
  // the SMs while each part keeps >= 4 steps (HSV_CUDA_SPLIT_K forces up to 8).
  const int64_t k_steps = k / ks;
  int64_t splits = split_k_from_env();
  if (splits == 0) {
    splits = 1;
    while (splits < 4 && tiles * splits < sms && k_steps / (2 * splits) >= 4) splits *= 2;
  }
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, k_steps, kMaxCluster}));
  p.steps_per_split = static_cast<int>((k_steps + splits - 1) / splits);
  splits = (k_steps + p.steps_per_split - 1) / p.steps_per_split;  // no CTA without K steps
  TORCH_CHECK(tiles * splits <= std::numeric_limits<int>::max(), "hsv::conv2d: wgmma kernel: too many pixel tiles");

  const int bytes = splits > 1 ? v.bytes_split : v.bytes_single;
  tiles::launch_in_clusters(v.fn, p, tiles * splits, 128 * wg, bytes, splits, device);
  if (!tail_in_stores) epilogue_pass_(out, tail);
  last_wg.store(wg);
  last_splits.store(splits);
  last_tiles.store(tiles);
  last_ks.store(ks);
  return out;
}

}  // namespace cuda
}  // namespace hsv
