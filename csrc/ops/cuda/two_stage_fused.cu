// Fused CUDA forward y = bias + U @ conv(x, V) in one kernel (kinds svd and
// hsv level 1 with S1 = 1; see two_stage_fused.h for how each maps to V, U).
//
// One CTA (4 warps) computes a tile of kTileM output pixels of one image:
//   stage 1  T (rp x M)   = Vp (rp x K) @ im2col(x)[K x M]    K = kh*kw*Cin
//            The im2col tile (kTileK x M) is gathered from global memory into
//            shared memory on the fly (zeros for padding taps, past-the-end
//            pixels and K past the end); it is never materialized in global
//            memory. K is ordered tap-major, channel-minor, so an NHWC input is
//            read along contiguous channels. Vp tiles come in by cp.async; both
//            operands are double-buffered (Vp through cp.async, the gathered
//            tile through registers). Warp w owns pixel columns [16w, 16w + 16)
//            and all rp/16 accumulator tiles of them.
//   stage 2  out (Cout x M) = bias + Up (Cout x rp) @ T, T read from shared
//            memory (rounded to the input dtype, as the composite chain rounds
//            its intermediate), Cout walked in chunks of kTileN, written once
//            through the output's strides.
// Split-K (gridDim.y > 1, for grids too small to fill the GPU: batch 1, small
// images): CTA (tile, s) runs stage 1 over its share of K only and atomically
// adds U @ T_s into a zeroed fp32 buffer laid out like the output; the host adds
// the bias and converts. HSV_CUDA_SPLIT_K forces a split count (tests).
// Vp = V permuted to (r, kh, kw, Cin) and zero-padded to (rp, k_pad); Up = U
// zero-padded to (cout_pad, rp): padding the factors (small, and cached per
// factor version, see packed_factors) leaves predicates only on the gathered
// input and on the output.
// Tensor cores through WMMA: fp16/bf16 operands m16n16k16, fp32 operands as
// TF32 m16n16k8; fp32 accumulation in both.
// fp16/bf16 channels_last inputs with Cin % 32 == 0 and Cout % 8 == 0 take a
// channels_last kernel instead: on compute capability 9.0 the mma.sync one
// (two_stage_mma.cu: ldmatrix, the intermediate in registers, split-K in a
// cluster), before that the WMMA one (two_stage_nhwc.cu: 16-byte cp.async
// gathers, a 4-deep pipeline). This one is the general path.
#include "two_stage_fused.h"

#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/kron.h>
#include <ATen/ops/zeros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <exception>
#include <functional>
#include <thread>
#include <vector>
#include <limits>
#include <initializer_list>
#include <type_traits>

#include "../cpu/pack.h"
#include "cuda_impl.h"
#include "pack_two_stage.h"
#include "two_stage_mma.h"
#include "two_stage_nhwc.h"
#include "two_stage_wgmma.h"
#include "wmma_tiles.cuh"

namespace hsv {
namespace cuda {
namespace {

using namespace nvcuda;
using namespace tiles;

struct Params {
  const void* x;                // input (N, Cin, H, W), read through its strides
  long long sn, sc, sh, sw;     // input strides (elements)
  int cin, h, w, kw;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int ho, wo, tiles_per_image;
  int k, k_pad;                 // K = kh*kw*Cin; row length of vp (multiple of kTileK)
  int rp;                       // padded rank (multiple of 16, <= kMaxRank)
  int cout;
  const void* vp;               // (rp, k_pad), zero-padded
  const void* up;               // (cout_pad, rp), cout_pad a multiple of kTileN, zero-padded
  const float* bias;            // cout floats, or nullptr
  void* out;
  long long on, oc, oh, ow;     // output strides (elements)
  int steps_per_split;          // K steps per CTA along gridDim.y (all of them without split-K)
  float* partial;               // split-K: fp32 output with out's strides, zeroed, summed into; else nullptr
};

// Shared memory, in bytes from the start of the dynamic buffer:
//   pix    per pixel of the tile: output offset (int64; -1 past the image end),
//          top-left input row and column of its receptive field (int)
//   t      the stage-2 operand T (rp x kTileM, S), alive from the end of stage 1
//   work   reused: stage 1 {a[2]: Vp tiles rp x kTileK, b[2]: gathered tiles
//          kTileK x kTileM}, then the fp32 accumulators of T (16-bit S only,
//          to be rounded into t), then stage 2 {u: Up chunk kTileN x rp,
//          o: fp32 output chunk kTileN x kTileM}.
// Row strides are padded by 16 bytes against bank conflicts; WMMA needs them to
// be multiples of 16 bytes and every tile corner 32-byte aligned, which holds
// for these strides at the row/column offsets (multiples of 8 or 16) used.
template <typename S>
struct Layout {
  static constexpr int kPad = 16 / static_cast<int>(sizeof(S));
  static constexpr bool kSpill = !std::is_same<S, float>::value;  // fp32 accumulators go through a buffer
  int ld_a, ld_b, ld_t, ld_f, ld_u;  // elements
  int pix, t, a0, a1, b0, b1, f, u, o, bytes;

  __host__ __device__ explicit Layout(int rp) {
    const int s = static_cast<int>(sizeof(S));
    ld_a = kTileK + kPad;
    ld_b = kTileM + kPad;
    ld_t = kTileM + kPad;
    ld_f = kTileM + 4;
    ld_u = rp + kPad;
    pix = 0;
    t = pix + align128(kTileM * (8 + 4 + 4));
    const int work = t + align128(rp * ld_t * s);
    a0 = work;
    a1 = a0 + align128(rp * ld_a * s);
    b0 = a1 + align128(rp * ld_a * s);
    b1 = b0 + align128(kTileK * ld_b * s);
    const int end1 = b1 + align128(kTileK * ld_b * s);
    f = work;
    const int end_f = kSpill ? f + align128(rp * ld_f * 4) : work;
    u = work;
    o = u + align128(kTileN * ld_u * s);
    const int end2 = o + align128(kTileN * ld_f * 4);
    bytes = end1 > end_f ? end1 : end_f;
    bytes = bytes > end2 ? bytes : end2;
  }
};

// im2col(x)[k][m] for this CTA's image: zero outside the image, for K past the
// end and for pixels past the image end.
template <typename S>
__device__ __forceinline__ S im2col_element(const Params& p, const S* x, int k, int m, const long long* pix_out,
                                            const int* pix_iy, const int* pix_ix) {
  if (k >= p.k || pix_out[m] < 0) return from_float<S>(0.0f);
  const int tap = k / p.cin, c = k - tap * p.cin;
  const int ty = tap / p.kw, tx = tap - ty * p.kw;
  const int iy = pix_iy[m] + ty * p.dil_h, ix = pix_ix[m] + tx * p.dil_w;
  if (iy < 0 || iy >= p.h || ix < 0 || ix >= p.w) return from_float<S>(0.0f);
  return x[c * p.sc + iy * p.sh + ix * p.sw];
}

template <typename S>
__global__ void __launch_bounds__(kThreads) two_stage_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched: the host side requires compute capability 8.0
#else
  constexpr int KK = Mma<S>::kK;
  using E = typename Mma<S>::Elem;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, KK, E, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, KK, E, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, KK, float>;
  constexpr bool kTf32 = std::is_same<S, float>::value;

  extern __shared__ __align__(128) unsigned char smem[];
  const Layout<S> L(p.rp);
  long long* pix_out = reinterpret_cast<long long*>(smem + L.pix);
  int* pix_iy = reinterpret_cast<int*>(smem + L.pix + kTileM * 8);
  int* pix_ix = pix_iy + kTileM;
  S* t_s = reinterpret_cast<S*>(smem + L.t);
  // The double buffers, picked by a select rather than by indexing a pointer
  // array with a run-time index (which would put the array in local memory).
  auto a_s = [&](int buf) { return reinterpret_cast<S*>(smem + (buf ? L.a1 : L.a0)); };
  auto b_s = [&](int buf) { return reinterpret_cast<S*>(smem + (buf ? L.b1 : L.b0)); };

  const int tid = threadIdx.x, warp = tid / 32;
  const int n = blockIdx.x / p.tiles_per_image;
  const int m0 = (blockIdx.x - n * p.tiles_per_image) * kTileM;
  const int hw_out = p.ho * p.wo;
  const S* x = static_cast<const S*>(p.x) + n * p.sn;
  const S* vp = static_cast<const S*>(p.vp);
  const S* up = static_cast<const S*>(p.up);
  S* out = static_cast<S*>(p.out);

  for (int m = tid; m < kTileM; m += kThreads) {
    const int q = m0 + m;
    if (q < hw_out) {
      const int oy = q / p.wo, ox = q - oy * p.wo;
      pix_out[m] = n * p.on + oy * p.oh + ox * p.ow;
      pix_iy[m] = oy * p.stride_h - p.pad_h;
      pix_ix[m] = ox * p.stride_w - p.pad_w;
    } else {
      pix_out[m] = -1;
      pix_iy[m] = 0;
      pix_ix[m] = 0;
    }
  }
  __syncthreads();

  // Stage 1: T = Vp @ im2col(x) over K in steps of kTileK.
  const bool channels_fastest = p.sc == 1;
  const int rank_tiles = p.rp / 16;
  // This CTA's K steps: all of them, or split blockIdx.y's share (split-K).
  const int k_steps = p.k_pad / kTileK;
  const int step_begin = blockIdx.y * p.steps_per_split;
  const int step_end = min(k_steps, step_begin + p.steps_per_split);
  S staged[kGatherPerThread];
  FragC acc[kMaxRankTiles];
#pragma unroll
  for (int i = 0; i < kMaxRankTiles; ++i) wmma::fill_fragment(acc[i], 0.0f);

  // Prologue: the first step into buffer 0.
  copy_tile_async(a_s(0), L.ld_a, vp + step_begin * kTileK, p.k_pad, p.rp, kTileK);
#pragma unroll
  for (int i = 0; i < kGatherPerThread; ++i) {
    int kk, m;
    gather_coords(tid + i * kThreads, channels_fastest, kk, m);
    b_s(0)[kk * L.ld_b + m] = im2col_element(p, x, step_begin * kTileK + kk, m, pix_out, pix_iy, pix_ix);
  }
  cp_async_wait_all();
  __syncthreads();

  for (int step = step_begin; step < step_end; ++step) {
    const int cur = (step - step_begin) & 1;
    const bool more = step + 1 < step_end;
    if (more) {  // start step + 1: buffer cur ^ 1 was last read in step - 1, before its closing barrier
      const int k0 = (step + 1) * kTileK;
      copy_tile_async(a_s(cur ^ 1), L.ld_a, vp + k0, p.k_pad, p.rp, kTileK);
#pragma unroll
      for (int i = 0; i < kGatherPerThread; ++i) {
        int kk, m;
        gather_coords(tid + i * kThreads, channels_fastest, kk, m);
        staged[i] = im2col_element(p, x, k0 + kk, m, pix_out, pix_iy, pix_ix);
      }
    }
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += KK) {
      FragB fb;
      wmma::load_matrix_sync(fb, b_s(cur) + kk * L.ld_b + warp * 16, L.ld_b);
      if constexpr (kTf32) round_to_tf32(fb);
#pragma unroll
      for (int i = 0; i < kMaxRankTiles; ++i) {
        if (i < rank_tiles) {
          FragA fa;
          wmma::load_matrix_sync(fa, a_s(cur) + i * 16 * L.ld_a + kk, L.ld_a);
          if constexpr (kTf32) round_to_tf32(fa);
          wmma::mma_sync(acc[i], fa, fb, acc[i]);
        }
      }
    }
    if (more) {
#pragma unroll
      for (int i = 0; i < kGatherPerThread; ++i) {
        int kk, m;
        gather_coords(tid + i * kThreads, channels_fastest, kk, m);
        b_s(cur ^ 1)[kk * L.ld_b + m] = staged[i];
      }
      cp_async_wait_all();
    }
    __syncthreads();
  }

  // T to shared memory in the operand dtype (stage-1 buffers are free now).
  if constexpr (Layout<S>::kSpill) {
    float* f_s = reinterpret_cast<float*>(smem + L.f);
#pragma unroll
    for (int i = 0; i < kMaxRankTiles; ++i) {
      if (i < rank_tiles) {
        wmma::store_matrix_sync(f_s + i * 16 * L.ld_f + warp * 16, acc[i], L.ld_f, wmma::mem_row_major);
      }
    }
    __syncthreads();
    for (int e = tid; e < p.rp * kTileM; e += kThreads) {
      const int r = e / kTileM, m = e - r * kTileM;
      t_s[r * L.ld_t + m] = from_float<S>(f_s[r * L.ld_f + m]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kMaxRankTiles; ++i) {
      if (i < rank_tiles) {
        wmma::store_matrix_sync(reinterpret_cast<float*>(t_s) + i * 16 * L.ld_t + warp * 16, acc[i], L.ld_t,
                                wmma::mem_row_major);
      }
    }
  }
  __syncthreads();

  // Stage 2: out = bias + Up @ T, kTileN output channels at a time.
  S* u_s = reinterpret_cast<S*>(smem + L.u);
  float* o_s = reinterpret_cast<float*>(smem + L.o);
  const bool out_channels_fastest = p.oc == 1;
  for (int co0 = 0; co0 < p.cout; co0 += kTileN) {
    copy_tile_async(u_s, L.ld_u, up + static_cast<long long>(co0) * p.rp, p.rp, kTileN, p.rp);
    cp_async_wait_all();
    __syncthreads();
    FragC c[kTileN / 16];
#pragma unroll
    for (int j = 0; j < kTileN / 16; ++j) wmma::fill_fragment(c[j], 0.0f);
    for (int k = 0; k < p.rp; k += KK) {
      FragB fb;
      wmma::load_matrix_sync(fb, t_s + k * L.ld_t + warp * 16, L.ld_t);
      if constexpr (kTf32) round_to_tf32(fb);
#pragma unroll
      for (int j = 0; j < kTileN / 16; ++j) {
        FragA fa;
        wmma::load_matrix_sync(fa, u_s + j * 16 * L.ld_u + k, L.ld_u);
        if constexpr (kTf32) round_to_tf32(fa);
        wmma::mma_sync(c[j], fa, fb, c[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kTileN / 16; ++j) {
      wmma::store_matrix_sync(o_s + j * 16 * L.ld_f + warp * 16, c[j], L.ld_f, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = tid; e < kTileN * kTileM; e += kThreads) {
      int j, m;
      if (out_channels_fastest) {
        j = e % kTileN;
        m = e / kTileN;
      } else {
        m = e % kTileM;
        j = e / kTileM;
      }
      const int co = co0 + j;
      if (co < p.cout && pix_out[m] >= 0) {
        const float v = o_s[j * L.ld_f + m];
        if (p.partial != nullptr) {  // split-K: U @ T_split summed over the splits; bias and dtype on the host
          atomicAdd(p.partial + pix_out[m] + co * p.oc, v);
        } else {
          out[pix_out[m] + co * p.oc] = from_float<S>(p.bias != nullptr ? v + p.bias[co] : v);
        }
      }
    }
    __syncthreads();  // u_s and o_s are rewritten by the next chunk
  }
#endif
}


int smem_bytes(at::ScalarType dtype, int64_t rp) {
  return dtype == at::kFloat ? Layout<float>(static_cast<int>(rp)).bytes
                             : Layout<__half>(static_cast<int>(rp)).bytes;  // same sizes for bf16
}

template <typename S>
void launch(const Params& p, dim3 grid, int smem, cudaStream_t stream) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  allow_max_dynamic_smem(reinterpret_cast<const void*>(&two_stage_kernel<S>), device);
  two_stage_kernel<S><<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernel's V (r, Cin, kh, kw) and U (Cout, r) for a kind, as sizes (for
// the checks) or as tensors (for the run); unsupported says why not, if not.
struct TwoStageShape {
  int64_t r = 0, cin = 0, kh = 0, kw = 0, cout = 0;
  const char* unsupported = nullptr;
};

constexpr int64_t kMaxHsvT2 = 4;

TwoStageShape two_stage_shape(at::TensorList factors, const std::string& kind) {
  TwoStageShape t;
  if (kind == "svd") {
    t.r = factors[0].size(0), t.cin = factors[0].size(1), t.kh = factors[0].size(2), t.kw = factors[0].size(3);
    t.cout = factors[1].size(0);
  } else if (kind == "hsv") {
    // level 1 only: [B (P, T2, S2, kh, kw), A (T1, S1, P)]
    if (factors.size() != 2 || factors[0].dim() != 5) {
      t.unsupported = "hsv with level-2 factors";
    } else if (factors[1].size(1) != 1) {
      t.unsupported = "hsv with S1 > 1";
    } else if (factors[0].size(1) > kMaxHsvT2) {
      t.unsupported = "hsv with T2 > 4";
    } else {
      const auto& B = factors[0];
      t.r = B.size(0) * B.size(1), t.cin = B.size(2), t.kh = B.size(3), t.kw = B.size(4);
      t.cout = factors[1].size(0) * B.size(1);
    }
  } else {
    t.unsupported = "no fused CUDA kernel for this kind";
  }
  return t;
}

std::pair<at::Tensor, at::Tensor> two_stage_factors(at::TensorList factors, const std::string& kind) {
  if (kind == "svd") return {factors[0], factors[1]};
  // hsv level 1, S1 = 1: stage-0 output channel p*T2 + t2 is row p*T2 + t2 of V,
  // and output channel t1*T2 + t2 = sum_p A[t1, 0, p] * that row: U = A kron I_T2.
  const auto& B = factors[0];
  const auto& A = factors[1];
  const int64_t P = B.size(0), T2 = B.size(1), T1 = A.size(0);
  const at::Tensor V = B.reshape({P * T2, B.size(2), B.size(3), B.size(4)});
  const at::Tensor U = at::kron(A.reshape({T1, P}), at::eye(T2, A.options()));
  return {V, U};
}

// The kernels' operands: Vp (rp, k_pad), V's rows with K ordered (tap,
// channel); Up (cout_pad, rp); the bias in fp32. Fresh zero-filled buffers, so
// rows are 16-byte aligned for cp.async whatever the factors' storage offsets.
struct PackedFactors {
  at::Tensor vp, up, bias_f;
};

// A buffer that no CUDA graph owns. While cudagraph trees
// (torch.compile mode="reduce-overhead") warm up or record, torch routes every
// allocation of the calling thread to the graph's private pool, which must then
// hold no tensor that outlives the graph, as a cached packed factor does. So
// the buffer is allocated by a short-lived thread of its own, and recorded on
// the current stream, which fills and reads it. Only on a cache miss.
at::Tensor persistent_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const c10::DeviceIndex device = options.device().index();
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device);
  const std::vector<int64_t> shape = sizes.vec();
  at::Tensor t;
  std::exception_ptr error;
  std::thread([&] {
    try {
      const c10::cuda::CUDAGuard guard(device);
      t = at::empty(shape, options);
    } catch (...) {
      error = std::current_exception();
    }
  }).join();
  if (error) std::rethrow_exception(error);
  c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), current);
  return t;
}

// The factors as pack_two_stage reads them: B (P, T2, Cin, kh, kw) and A (T1, P)
// with U = A kron I_T2; svd is T2 = 1.
std::pair<at::Tensor, at::Tensor> pack_views(at::TensorList factors, const std::string& kind) {
  if (kind == "svd") return {factors[0].unsqueeze(1), factors[1]};
  return {factors[0], factors[1].select(1, 0)};
}

// Packing costs 4 to 6 small kernels and allocations per call (10 to 30 us at
// batch 1), so each packed operand is cached against the factor it comes from
// (cpu::packed_cached: same tensor, unchanged version). Not while a CUDA graph
// is being captured: a buffer made then holds its values only once the graph
// replays, so a later eager call must not find it in the cache (and a replay
// must see in-place updates of the factors): there packing runs on every call.
// By default one kernel of our own packs (pack_two_stage.h); HSV_CUDA_PACK=aten
// uses the ATen ops instead.
PackedFactors packed_factors(at::TensorList factors, const c10::optional<at::Tensor>& bias, const std::string& kind,
                             int64_t rp, int64_t k_pad, int64_t cout_pad) {
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const bool has_bias = bias.has_value() && bias->defined();
  const std::string tag = "cuda-two-stage:" + kind + ":rp=" + std::to_string(rp) + ":";
  // Up depends on factors[1] and, for hsv, on T2 = B.size(1): in the layout string.
  const std::string up_tag = tag + "up:cout=" + std::to_string(cout_pad) + ":t2=" +
                             std::to_string(kind == "hsv" ? factors[0].size(1) : 1);
  if (pack_with_kernel()) {
    const auto views = pack_views(factors, kind);
    const auto opts = factors[0].options();
    const at::Tensor bias_s = has_bias ? bias->to(factors[0].scalar_type()) : at::Tensor();  // no-op when equal
    PackedFactors out;
    if (capturing) {  // all three in one launch: it runs on every replay
      out.vp = at::empty({rp, k_pad}, opts);
      out.up = at::empty({cout_pad, rp}, opts);
      if (has_bias) out.bias_f = at::empty({bias->numel()}, bias->options().dtype(at::kFloat));
      pack_two_stage(views.first, views.second, bias_s, out.vp, out.up, out.bias_f);
      return out;
    }
    out.vp = cpu::packed_cached(factors[0], tag + "vp:k=" + std::to_string(k_pad), [&] {
      at::Tensor vp = persistent_empty({rp, k_pad}, opts);
      pack_two_stage(views.first, views.second, at::Tensor(), vp, at::Tensor(), at::Tensor());
      return vp;
    });
    out.up = cpu::packed_cached(factors[1], up_tag, [&] {
      at::Tensor up = persistent_empty({cout_pad, rp}, opts);
      pack_two_stage(views.first, views.second, at::Tensor(), at::Tensor(), up, at::Tensor());
      return up;
    });
    if (has_bias) {
      out.bias_f = cpu::packed_cached(*bias, "cuda-bias-f32", [&] {
        at::Tensor bf = persistent_empty({bias->numel()}, bias->options().dtype(at::kFloat));
        pack_two_stage(views.first, views.second, bias_s, at::Tensor(), at::Tensor(), bf);
        return bf;
      });
    }
    return out;
  }
  auto cached = [&](const at::Tensor& key, const std::string& layout, const std::function<at::Tensor()>& make) {
    return capturing ? make() : cpu::packed_cached(key, layout, make);
  };
  auto zeros = [&](at::IntArrayRef sizes, const at::TensorOptions& options) {
    return capturing ? at::zeros(sizes, options) : persistent_empty(sizes, options).zero_();
  };
  PackedFactors out;
  out.vp = cached(factors[0], tag + "vp:k=" + std::to_string(k_pad), [&] {
    const at::Tensor V = two_stage_factors(factors, kind).first;
    const int64_t r = V.size(0), k = V.size(1) * V.size(2) * V.size(3);
    at::Tensor vp = zeros({rp, k_pad}, V.options());
    vp.narrow(0, 0, r).narrow(1, 0, k).copy_(V.permute({0, 2, 3, 1}).reshape({r, k}));
    return vp;
  });
  out.up = cached(factors[1], up_tag, [&] {
    const at::Tensor U = two_stage_factors(factors, kind).second;
    at::Tensor upad = zeros({cout_pad, rp}, U.options());
    upad.narrow(0, 0, U.size(0)).narrow(1, 0, U.size(1)).copy_(U);
    return upad;
  });
  if (has_bias) {
    out.bias_f = cached(*bias, "cuda-bias-f32", [&] {
      return zeros({bias->numel()}, bias->options().dtype(at::kFloat)).copy_(*bias);
    });
  }
  return out;
}

}  // namespace

int64_t two_stage_max_rank() { return kMaxRank; }

bool two_stage_dtype_supported(at::ScalarType dtype) {
  // The fp32 path computes in TF32; with TF32 off for cuDNN the chain is the exact one.
  return dtype == at::kHalf || dtype == at::kBFloat16 || (dtype == at::kFloat && at::globalContext().allowTF32CuDNN());
}

bool two_stage_supports(const at::Tensor& input, at::TensorList factors, const Plan& plan, const std::string& kind,
                        std::string* reason) {
  auto no = [&](const char* why) {
    if (reason) *reason = why;
    return false;
  };
  const TwoStageShape shape = two_stage_shape(factors, kind);
  if (shape.unsupported) return no(shape.unsupported);
  if (shape.cin == 0) return no("no input channels (K = 0)");
  if (!input.is_cuda()) return no("input is not on a CUDA device");
  const auto dtype = input.scalar_type();
  if (!two_stage_dtype_supported(dtype)) {
    return no(dtype == at::kFloat ? "fp32 with cudnn.allow_tf32 off" : "dtype is not fp16/bf16/fp32");
  }
  const DeviceInfo dev = device_info(input.device().index());
  if (dev.major < 8) return no("needs compute capability 8.0 or newer");
  const int64_t rp = round_up(shape.r, 16);
  if (rp > kMaxRank) return no("rank above the fused kernel's limit");
  if (smem_bytes(dtype, rp) > dev.smem_optin) return no("shared memory");
  // Per-image indices are 32-bit in the kernel (input rows and columns, padding
  // and dilated taps included, K, output pixels); global offsets are 64-bit.
  const int64_t limit = std::numeric_limits<int>::max() / 4;
  const ConvParams& cv = plan.stages[0].conv;
  const int64_t k = shape.cin * shape.kh * shape.kw;
  const int64_t reach_h = input.size(2) + 2 * cv.padding[0] + cv.dilation[0] * shape.kh;
  const int64_t reach_w = input.size(3) + 2 * cv.padding[1] + cv.dilation[1] * shape.kw;
  if (k > limit || reach_h > limit || reach_w > limit || plan.out_shape[2] * plan.out_shape[3] > limit ||
      shape.cout > limit) {
    return no("sizes above the 32-bit index range");
  }
  return true;
}

// From graph replays on an H100 (bench/results/gpu-h100-2026-11-22-session4.md):
// the mma kernel on a spatial conv with <= 128 input channels took 0.37 to 0.78
// of the composite chain's time at batch 1 and 32 (svd at 128 channels, batch
// 32: 1.0 to 1.05); with >= 256 channels 1.0 to 1.8, on 1x1 convs 1.75 to 2.35.
// The WMMA kernel took 0.6 to 4.4x composite's time in the same sweep; the
// general kernel (fp32/TF32, NCHW) was 3 to 20x slower than composite at batch
// 32 (session 1), and made whole fp32 models 3.8 to 6.4x slower than dense:
// they run only where asked for (HSV_CUDA_IMPL=fused) or timed faster.
bool two_stage_fused_by_default(const at::Tensor& input, at::TensorList factors, const std::string& kind) {
  const TwoStageShape shape = two_stage_shape(factors, kind);
  return shape.kh * shape.kw > 1 && shape.cin <= 128 && nhwc_supports(input, shape.cin, shape.r, shape.cout) &&
         mma_selected(input);
}

at::Tensor two_stage_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                             const Plan& plan, const std::string& kind, const Tail& tail) {
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t n = input.size(0);
  if (n == 0) return at::empty(plan.out_shape, input.options().memory_format(output_memory_format(input)));

  const TwoStageShape shape = two_stage_shape(factors, kind);
  const int64_t r = shape.r, cin = shape.cin, kh = shape.kh, kw = shape.kw, cout = shape.cout;
  TORCH_CHECK(cout == plan.out_channels, "hsv::conv2d: fused kernel: inconsistent factors");
  const bool nhwc = nhwc_supports(input, cin, r, cout);
  const int64_t k = kh * kw * cin, k_pad = round_up(k, kTileK);
  const int64_t rp = nhwc ? nhwc_padded_rank(r) : round_up(r, 16);
  const int64_t cout_pad = round_up(cout, kTileN);
  const PackedFactors packed = packed_factors(factors, bias, kind, rp, k_pad, cout_pad);
  if (nhwc && wgmma_selected(input)) {
    at::Tensor y = wgmma_forward(input, packed.vp, packed.up, packed.bias_f, plan, kh, kw, cout, tail);
    count_fused_launch();
    count_nhwc_launch();
    count_wgmma_launch();
    return y;
  }
  if (nhwc && mma_selected(input)) {
    at::Tensor y = mma_forward(input, packed.vp, packed.up, packed.bias_f, plan, kh, kw, cout, tail);
    count_fused_launch();
    count_nhwc_launch();
    count_mma_launch();
    return y;
  }
  if (nhwc) {
    at::Tensor y = nhwc_forward(input, packed.vp, packed.up, packed.bias_f, plan, kh, kw, cout, tail);
    count_fused_launch();
    count_nhwc_launch();
    return y;
  }
  const at::Tensor& vp = packed.vp;
  const at::Tensor& upad = packed.up;
  const at::Tensor& bias_f = packed.bias_f;
  at::Tensor out = at::empty(plan.out_shape, input.options().memory_format(output_memory_format(input)));

  const ConvParams& cv = plan.stages[0].conv;
  Params p{};
  p.x = input.data_ptr();
  p.sc = input.stride(1);
  set_conv_geometry(p, input, plan, cv, kw);
  const int64_t tiles = (plan.out_shape[2] * plan.out_shape[3] + kTileM - 1) / kTileM;
  p.tiles_per_image = static_cast<int>(tiles);
  p.k = static_cast<int>(k);
  p.k_pad = static_cast<int>(k_pad);
  p.rp = static_cast<int>(rp);
  p.cout = static_cast<int>(cout);
  p.vp = vp.data_ptr();
  p.up = upad.data_ptr();
  p.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.on = out.stride(0);
  p.oc = out.stride(1);
  p.oh = out.stride(2);
  p.ow = out.stride(3);

  const int64_t blocks = n * tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "hsv::conv2d: fused kernel: too many pixel tiles (",
              blocks, ")");
  const int64_t k_steps = k_pad / kTileK;
  const int64_t forced = split_k_from_env();
  int64_t splits = forced > 0 ? forced : auto_splits(blocks, k_pad, cout_pad, device_info(input.device().index()).sms, kTileK);
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, k_steps, 65535}));
  p.steps_per_split = static_cast<int>((k_steps + splits - 1) / splits);
  splits = (k_steps + p.steps_per_split - 1) / p.steps_per_split;  // no empty split
  at::Tensor partial;
  if (splits > 1) {
    // empty_like keeps out's strides (at::zeros would drop the memory format and
    // give an NCHW buffer for a channels_last output).
    partial = at::empty_like(out, out.options().dtype(at::kFloat)).zero_();
    TORCH_CHECK(partial.strides() == out.strides(), "hsv::conv2d: fused kernel: split-K buffer layout mismatch");
    p.partial = partial.data_ptr<float>();
  }
  const int smem = smem_bytes(input.scalar_type(), rp);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index());
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  switch (input.scalar_type()) {
    case at::kHalf:
      launch<__half>(p, grid, smem, stream);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16>(p, grid, smem, stream);
      break;
    case at::kFloat:
      launch<float>(p, grid, smem, stream);
      break;
    default:
      TORCH_CHECK(false, "hsv::conv2d: fused kernel called with dtype ", input.scalar_type());
  }
  if (splits > 1) {  // the parts' sum, plus bias, in the output dtype and layout
    out.copy_(bias_f.defined() ? partial + bias_f.view({1, cout, 1, 1}) : partial);
  }
  epilogue_pass_(out, tail);
  count_fused_launch();
  return out;
}

}  // namespace cuda
}  // namespace hsv
