// NHWC fast path of the fused two-stage forward y = bias + U @ conv(x, V)
// (fp16/bf16; see two_stage_nhwc.h for when it applies).
//
// The pixels of all images form one M axis (N*Ho*Wo), cut into tiles of
// kTileM = 64*MF pixels; a CTA of 4 warps computes one tile, warp w owning 16*MF
// consecutive pixels in both stages:
//   stage 1  T^T (pixels x rp) accumulated as T (rp x pixels) = Vp @ im2col(x),
//            K = (tap, channel) walked in steps of 32 channels of one tap
//            (Cin % 32 == 0), so a step's gather is, per pixel, one 64-byte run
//            of its channels at one input position: four 16-byte cp.async
//            copies, zero-filled by the copy itself for padding taps and pixels
//            past the end. Vp's 32 columns come in by cp.async too. A
//            kStages-deep cp.async pipeline keeps kStages-1 steps in flight and
//            needs one barrier per step; no loads go through registers and no
//            index division runs per element (one per step).
//   stage 2  out^T (pixels x Cout) = bias + T^T (rounded to the input dtype, as
//            the composite chain rounds its intermediate) @ Up^T, in chunks of
//            64 output channels whose Up rows are double-buffered by cp.async;
//            each warp writes its own rows as 16-byte stores along the channels.
// Split-K (gridDim.y > 1) as in two_stage_fused.cu: each part adds U @ T_part
// into an fp32 buffer with atomics and the host finishes (bias, dtype).
// Tensor cores through WMMA (m16n16k16, fp32 accumulation). The accumulator
// count is a template (RT rank tiles x MF pixel tiles), so registers hold them.
#include "two_stage_nhwc.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <limits>

#include "cuda_impl.h"
#include "wmma_tiles.cuh"

namespace hsv {
namespace cuda {
namespace {

using namespace nvcuda;
using tiles::align128;
using tiles::from_float;

constexpr int kThreads = 128;     // 4 warps
constexpr int kKStep = 32;        // K per pipeline step: 32 channels of one tap
constexpr int kStages = 4;        // cp.async pipeline depth
constexpr int kLdIn = kKStep + 8; // 80-byte rows: ldmatrix reads 8 rows without bank conflicts
constexpr int kCoChunk = 64;      // output channels per stage-2 chunk

struct NhwcParams {
  const void* x;            // (N, Cin, H, W) with unit channel stride
  long long sn, sh, sw;     // its other strides (elements, multiples of 8)
  int h, w, cin, kw;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int ho, wo;
  long long pixels;         // N * Ho * Wo
  int k;                    // kh * kw * Cin (a multiple of kKStep)
  int cout;                 // a multiple of 8
  int cout_pad;             // a multiple of kCoChunk
  const void* vp;           // (rp, k)
  const void* up;           // (cout_pad, rp)
  const float* bias;        // cout floats or nullptr
  void* out;                // channels_last contiguous: pixel p, channel c at p * cout + c
  const void* residual;     // conv2d_epilogue: added to out (its layout), or nullptr
  bool relu;                // conv2d_epilogue: ReLU after the residual
  float* partial;           // split-K: fp32, same layout, zeroed; else nullptr
  int steps_per_split;
};

constexpr int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

// Shared memory: [t | work]. t: T^T in the operand dtype, (kTileM x rp) rows
// of ldt. work: the pipeline (kStages x {Vp tile rp x 32, gathered tile
// kTileM x 32}), then T^T in fp32 (from the accumulators), then stage 2's
// {u0, u1: Up chunks 64 x rp; o: fp32 output rows kTileM x 64}.
template <int RT, int MF>
struct NhwcLayout {
  static constexpr int kRp = 16 * RT;
  static constexpr int kTileM = 16 * MF * (kThreads / 32);
  static constexpr int kLdT = kRp + 8;
  static constexpr int kLdF = kRp + 4;
  static constexpr int kLdU = kRp + 8;
  static constexpr int kLdO = kCoChunk + 4;
  static constexpr int kA = align128(kRp * kLdIn * 2);
  static constexpr int kB = align128(kTileM * kLdIn * 2);
  static constexpr int kStage = kA + kB;
  static constexpr int kT = align128(kTileM * kLdT * 2);
  static constexpr int kF = align128(kTileM * kLdF * 4);
  static constexpr int kU = align128(kCoChunk * kLdU * 2);
  static constexpr int kO = align128(kTileM * kLdO * 4);
  static constexpr int kBytes = kT + max3(kStages * kStage, kF, 2 * kU + kO);
};

// Eight floats as eight 16-bit values in one 16-byte word.
__device__ __forceinline__ unsigned pack2(float a, float b, __half*) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ unsigned pack2(float a, float b, __nv_bfloat16*) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<unsigned*>(&v);
}
template <typename S>
__device__ __forceinline__ uint4 pack8(const float* v) {
  S* tag = nullptr;
  return make_uint4(pack2(v[0], v[1], tag), pack2(v[2], v[3], tag), pack2(v[4], v[5], tag), pack2(v[6], v[7], tag));
}

template <typename S, int RT, int MF>
__global__ void __launch_bounds__(kThreads) nhwc_kernel(const NhwcParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched: the host side requires compute capability 8.0
#else
  using L = NhwcLayout<RT, MF>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, S, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, S, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  constexpr int kRp = L::kRp;
  constexpr int kWarpM = 16 * MF;
  constexpr int kPieces = L::kTileM * (kKStep / 8) / kThreads;  // gathered 16-byte pieces per thread and step

  extern __shared__ __align__(128) unsigned char smem[];
  S* t_s = reinterpret_cast<S*>(smem);
  unsigned char* work = smem + L::kT;
  auto a_tile = [&](int stage) { return reinterpret_cast<S*>(work + stage * L::kStage); };
  auto b_tile = [&](int stage) { return reinterpret_cast<S*>(work + stage * L::kStage + L::kA); };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const long long p0 = static_cast<long long>(blockIdx.x) * L::kTileM;
  const S* x = static_cast<const S*>(p.x);
  const S* vp = static_cast<const S*>(p.vp);
  const S* up = static_cast<const S*>(p.up);

  // This thread's gather pieces: piece id = tid + j * kThreads is pixel id / 4 of
  // the tile, channels 8 * (id % 4) .. + 8 of the step's 32. Per pixel: the
  // image's base offset (plus the piece's channels; -1 past the end) and the
  // top-left input position of its receptive field.
  long long g_base[kPieces];
  int g_iy[kPieces], g_ix[kPieces];
#pragma unroll
  for (int j = 0; j < kPieces; ++j) {
    const int id = tid + j * kThreads;
    const long long pix = p0 + id / 4;
    if (pix < p.pixels) {
      int n;
      tiles::pixel_origin(p, pix, n, g_iy[j], g_ix[j]);
      g_base[j] = n * p.sn + (id % 4) * 8;
    } else {
      g_base[j] = -1;
      g_iy[j] = 0;
      g_ix[j] = 0;
    }
  }

  const int csteps = p.cin / kKStep;
  const int k_steps = p.k / kKStep;
  const int s_begin = blockIdx.y * p.steps_per_split;
  const int nsteps = min(k_steps, s_begin + p.steps_per_split) - s_begin;

  // Step `step`'s operands into pipeline stage `stage` (cp.async, not waited for).
  auto issue = [&](int step, int stage) {
    const int tap = step / csteps, c0 = (step - tap * csteps) * kKStep;
    const int ty = tap / p.kw, tx = tap - ty * p.kw;
    S* b = b_tile(stage);
#pragma unroll
    for (int j = 0; j < kPieces; ++j) {
      const int id = tid + j * kThreads;
      const int iy = g_iy[j] + ty * p.dil_h, ix = g_ix[j] + tx * p.dil_w;
      const bool ok = g_base[j] >= 0 && iy >= 0 && iy < p.h && ix >= 0 && ix < p.w;
      const S* src = ok ? x + g_base[j] + iy * p.sh + ix * p.sw + c0 : x;
      tiles::cp_async16_zfill(b + (id / 4) * kLdIn + (id % 4) * 8, src, ok);
    }
    S* a = a_tile(stage);
    const S* v = vp + static_cast<long long>(step) * kKStep;
    for (int i = tid; i < kRp * 4; i += kThreads) {
      tiles::cp_async16(a + (i / 4) * kLdIn + (i % 4) * 8, v + static_cast<long long>(i / 4) * p.k + (i % 4) * 8);
    }
  };

  // Stage 1. Every thread commits one group per step (empty past the end), so
  // wait_group counts line up.
  FragC acc[MF][RT];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) wmma::fill_fragment(acc[mf][rt], 0.0f);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nsteps) issue(s_begin + s, s);
    tiles::cp_async_commit();
  }
  for (int s = 0; s < nsteps; ++s) {
    tiles::cp_async_wait<kStages - 2>();  // step s has landed (this thread's copies) ...
    __syncthreads();                       // ... everyone's, and step s - 1's stage is free
    if (s + kStages - 1 < nsteps) issue(s_begin + s + kStages - 1, (s + kStages - 1) % kStages);
    tiles::cp_async_commit();
    const S* a = a_tile(s % kStages);
    const S* b = b_tile(s % kStages);
#pragma unroll
    for (int kk = 0; kk < kKStep; kk += 16) {
      FragB fb[MF];
#pragma unroll
      for (int mf = 0; mf < MF; ++mf) wmma::load_matrix_sync(fb[mf], b + (warp * kWarpM + mf * 16) * kLdIn + kk, kLdIn);
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        FragA fa;
        wmma::load_matrix_sync(fa, a + rt * 16 * kLdIn + kk, kLdIn);
#pragma unroll
        for (int mf = 0; mf < MF; ++mf) wmma::mma_sync(acc[mf][rt], fa, fb[mf], acc[mf][rt]);
      }
    }
  }
  tiles::cp_async_wait<0>();
  __syncthreads();  // the pipeline's memory becomes f_s

  // T^T to shared memory: fp32 from the accumulators (column-major store of the
  // rank x pixel tiles gives pixel-major rows), then each warp rounds its own rows.
  float* f_s = reinterpret_cast<float*>(work);
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
      wmma::store_matrix_sync(f_s + (warp * kWarpM + mf * 16) * L::kLdF + rt * 16, acc[mf][rt], L::kLdF,
                              wmma::mem_col_major);
  __syncwarp();
  for (int e = lane; e < kWarpM * kRp; e += 32) {
    const int m = warp * kWarpM + e / kRp, r = e % kRp;
    t_s[m * L::kLdT + r] = from_float<S>(f_s[m * L::kLdF + r]);
  }
  __syncthreads();  // f_s becomes the stage-2 buffers

  // Stage 2: 64 output channels at a time.
  S* u0 = reinterpret_cast<S*>(work);
  S* u1 = reinterpret_cast<S*>(work + L::kU);
  float* o_s = reinterpret_cast<float*>(work + 2 * L::kU);
  auto issue_u = [&](int chunk, S* dst) {
    const S* src = up + static_cast<long long>(chunk) * kCoChunk * kRp;
    for (int i = tid; i < kCoChunk * kRp / 8; i += kThreads) {
      const int row = i / (kRp / 8), piece = i % (kRp / 8);
      tiles::cp_async16(dst + row * L::kLdU + piece * 8, src + row * kRp + piece * 8);
    }
  };
  const int chunks = p.cout_pad / kCoChunk;
  issue_u(0, u0);
  tiles::cp_async_commit();
  for (int c = 0; c < chunks; ++c) {
    const S* u = (c & 1) ? u1 : u0;
    if (c + 1 < chunks) {
      issue_u(c + 1, (c & 1) ? u0 : u1);  // that buffer was last read in chunk c - 1, before its closing barrier
      tiles::cp_async_commit();
      tiles::cp_async_wait<1>();
    } else {
      tiles::cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int mf = 0; mf < MF; ++mf) {
      const int m0 = warp * kWarpM + mf * 16;
      FragC o[kCoChunk / 16];
#pragma unroll
      for (int j = 0; j < kCoChunk / 16; ++j) wmma::fill_fragment(o[j], 0.0f);
#pragma unroll
      for (int k = 0; k < kRp; k += 16) {
        FragA ta;
        wmma::load_matrix_sync(ta, t_s + m0 * L::kLdT + k, L::kLdT);
#pragma unroll
        for (int j = 0; j < kCoChunk / 16; ++j) {
          FragB ub;
          wmma::load_matrix_sync(ub, u + j * 16 * L::kLdU + k, L::kLdU);
          wmma::mma_sync(o[j], ta, ub, o[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < kCoChunk / 16; ++j)
        wmma::store_matrix_sync(o_s + m0 * L::kLdO + j * 16, o[j], L::kLdO, wmma::mem_row_major);
    }
    __syncwarp();
    // The warp's rows out: 8 pieces of 8 channels per pixel, 16 bytes each.
    for (int e = lane; e < kWarpM * (kCoChunk / 8); e += 32) {
      const int m = warp * kWarpM + e / (kCoChunk / 8), piece = e % (kCoChunk / 8);
      const long long pix = p0 + m;
      const int co = c * kCoChunk + piece * 8;
      if (pix >= p.pixels || co >= p.cout) continue;
      float v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = o_s[m * L::kLdO + piece * 8 + i];
      if (p.partial != nullptr) {
        float* dst = p.partial + pix * p.cout + co;
#if __CUDA_ARCH__ >= 900  // vector atomics: a quarter of the atomic operations
        atomicAdd(reinterpret_cast<float4*>(dst), make_float4(v[0], v[1], v[2], v[3]));
        atomicAdd(reinterpret_cast<float4*>(dst + 4), make_float4(v[4], v[5], v[6], v[7]));
#else
#pragma unroll
        for (int i = 0; i < 8; ++i) atomicAdd(dst + i, v[i]);
#endif
      } else {
        if (p.bias != nullptr) {
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] += p.bias[co + i];
        }
        const long long at = pix * p.cout + co;
        const S* res = p.residual != nullptr ? static_cast<const S*>(p.residual) + at : nullptr;
        *reinterpret_cast<uint4*>(static_cast<S*>(p.out) + at) = tiles::tail8<S>(pack8<S>(v), res, p.relu);
      }
    }
    __syncthreads();  // u (refilled two chunks on) and o_s (next chunk) are free
  }
#endif
}

template <typename S, int RT, int MF>
void launch_one(const NhwcParams& p, dim3 grid, cudaStream_t stream, int device) {
  const auto kernel = &nhwc_kernel<S, RT, MF>;
  tiles::allow_max_dynamic_smem(reinterpret_cast<const void*>(kernel), device);
  kernel<<<grid, kThreads, NhwcLayout<RT, MF>::kBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S, int MF>
void launch_rt(const NhwcParams& p, int rt, dim3 grid, cudaStream_t stream, int device) {
  switch (rt) {
    case 1: return launch_one<S, 1, MF>(p, grid, stream, device);
    case 2: return launch_one<S, 2, MF>(p, grid, stream, device);
    case 4: return launch_one<S, 4, MF>(p, grid, stream, device);
    default: return launch_one<S, 8, 1>(p, grid, stream, device);  // 8 x 2 accumulator tiles would not fit
  }
}

template <typename S>
void launch(const NhwcParams& p, int rt, int mf, dim3 grid, cudaStream_t stream, int device) {
  if (mf == 2) return launch_rt<S, 2>(p, rt, grid, stream, device);
  launch_rt<S, 1>(p, rt, grid, stream, device);
}

}  // namespace

bool nhwc_supports(const at::Tensor& input, int64_t cin, int64_t rank, int64_t cout) {
  const auto dtype = input.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (input.dim() != 4 || input.stride(1) != 1) return false;
  if (input.stride(0) % 8 != 0 || input.stride(2) % 8 != 0 || input.stride(3) % 8 != 0) return false;
  if (reinterpret_cast<uintptr_t>(input.data_ptr()) % 16 != 0) return false;
  if (cin % kKStep != 0 || cout % 8 != 0 || rank < 1 || rank > 128) return false;
  // the output this path writes is channels_last contiguous: the op's output
  // format must be that (it follows the input's)
  return output_memory_format(input) == at::MemoryFormat::ChannelsLast;
}

int64_t nhwc_padded_rank(int64_t rank) {
  int64_t rp = 16;
  while (rp < rank) rp *= 2;
  return rp;
}

at::Tensor nhwc_forward(const at::Tensor& input, const at::Tensor& vp, const at::Tensor& up,
                        const at::Tensor& bias_f, const Plan& plan, int64_t kh, int64_t kw, int64_t cout,
                        const Tail& tail) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(plan.out_shape, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t n = input.size(0);
  if (n == 0) return out;
  TORCH_CHECK(out.is_contiguous(at::MemoryFormat::ChannelsLast), "hsv::conv2d: NHWC kernel: output layout");
  const int64_t cin = input.size(1), rp = vp.size(0), k = kh * kw * cin;
  TORCH_CHECK(vp.size(1) == k && up.size(1) == rp && up.size(0) % kCoChunk == 0 && vp.is_contiguous() &&
                  up.is_contiguous(),
              "hsv::conv2d: NHWC kernel: packed factors of the wrong shape");
  NhwcParams p{};
  tiles::set_two_stage_operands(p, input, vp, up, bias_f, out, plan, k, kw, cout);

  const int device = input.device().index();
  const int64_t sms = tiles::device_info(device).sms;
  const int rt = static_cast<int>(rp / 16);
  // Two pixel tiles per warp where the larger tile still fills every SM once.
  const int mf = (rt <= 4 && p.pixels / 128 >= sms) ? 2 : 1;
  const int64_t tile_m = 64 * mf;
  const int64_t blocks = (p.pixels + tile_m - 1) / tile_m;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "hsv::conv2d: NHWC kernel: too many pixel tiles");
  const int64_t k_steps = k / kKStep;
  const int64_t forced = split_k_from_env();
  int64_t splits = forced > 0 ? forced : tiles::auto_splits(blocks, k, p.cout_pad, sms, kKStep);
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, k_steps, 65535}));
  p.steps_per_split = static_cast<int>((k_steps + splits - 1) / splits);
  splits = (k_steps + p.steps_per_split - 1) / p.steps_per_split;  // no empty split
  at::Tensor partial;
  if (splits > 1) {
    partial = at::empty_like(out, out.options().dtype(at::kFloat)).zero_();  // keeps out's strides
    TORCH_CHECK(partial.strides() == out.strides(), "hsv::conv2d: NHWC kernel: split-K buffer layout mismatch");
    p.partial = partial.data_ptr<float>();
  }
  // The tail goes into the stores unless split-K's parts are summed after the kernel.
  const bool tail_in_stores = splits == 1 && tail.fits_stores_of(out);
  if (tail_in_stores) tiles::set_tail(p, tail.residual_data(), tail.relu);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  if (input.scalar_type() == at::kHalf) {
    launch<__half>(p, rt, mf, grid, stream, device);
  } else {
    launch<__nv_bfloat16>(p, rt, mf, grid, stream, device);
  }
  if (splits > 1) out.copy_(bias_f.defined() ? partial + bias_f.view({1, cout, 1, 1}) : partial);
  if (!tail_in_stores) epilogue_pass_(out, tail);
  return out;
}

}  // namespace cuda
}  // namespace hsv
