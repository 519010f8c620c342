// Fused CUDA forward of kind "tucker2": out = bias + U_T @ conv(U_S @ x, core).
//
// One CTA (4 warps) computes an 8 x 8 tile of output pixels of one image:
//   stage 0  Z (rsp x halo) = U_S (rsp x Cin) @ x[:, halo]   for the input
//            pixels the tile's receptive fields cover (its halo: 7*stride +
//            (k-1)*dilation + 1 rows and columns, zeros outside the image,
//            which is the zero padding the kh x kw conv sees), 64 halo pixels
//            per pass; Z stays in shared memory in the operand dtype.
//   stage 1  T (rtp x 64) = core (rtp x K1) @ im2col(Z), K1 = kh*kw*R_S in
//            (tap, R_S) order, gathered from Z in shared memory.
//   stage 2  out (Cout x 64) = bias + U_T @ T, as in two_stage_fused.cu.
// Stage 0 recomputes the halo overlap of neighbouring tiles (1.56x its MACs
// for 3x3 stride 1) in exchange for never writing Z or T to global memory.
// Each stage's GEMM is rank_gemm: the A operand (a zero-padded factor) comes
// in by cp.async, the B operand is gathered, both double-buffered.
// TODO (after GPU verification): larger spatial tiles for stride 2, ranks
// above 128, cached packed factors.
#include "tucker2_fused.h"

#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "cuda_impl.h"
#include "wmma_tiles.cuh"

namespace hsv {
namespace cuda {
namespace {

using namespace nvcuda;
using namespace tiles;

constexpr int kTileH = 8, kTileW = 8;  // output tile: kTileM pixels
static_assert(kTileH * kTileW == kTileM, "the spatial tile is one pixel tile");

struct Params {
  const void* x;                // input (N, Cin, H, W), read through its strides
  long long sn, sc, sh, sw;     // input strides (elements)
  int cin, h, w, kw;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int ho, wo, tiles_w, tiles_per_image;
  int halo_w, halo_px, halo_cols;  // halo columns, pixels, and Z's used row length (multiple of kTileM)
  int cin_pad;                  // row length of usp (multiple of kTileK)
  int rs, rsp;                  // R_S and its padding to 16
  int k1, k1_pad;               // K1 = kh*kw*R_S; row length of cp (multiple of kTileK)
  int rtp;                      // R_T padded to 16
  int cout;
  const void* usp;              // (rsp, cin_pad), zero-padded
  const void* cp;               // (rtp, k1_pad): core as (R_T, kh, kw, R_S), zero-padded
  const void* utp;              // (cout_pad, rtp), cout_pad a multiple of kTileN, zero-padded
  const float* bias;            // cout floats, or nullptr
  void* out;
  long long on, oc, oh, ow;     // output strides (elements)
};

// Shared memory, in bytes from the start of the dynamic buffer:
//   pix    per output pixel of the tile: output offset (int64; -1 outside the
//          output), row and column of its receptive field's corner in the halo
//   z      Z (rsp x ld_z, S), alive from stage 0 through stage 1
//   t      T (rtp x ld_t, S), alive from stage 1 through stage 2
//   work   reused: rank_gemm's buffers {a[2]: factor tiles rows x kTileK,
//          b[2]: gathered tiles kTileK x kTileM}, then the fp32 accumulators
//          on their way to z or t (16-bit S only), then stage 2 {u: U_T chunk
//          kTileN x rtp, o: fp32 output chunk kTileN x kTileM}.
// Strides as in two_stage_fused.cu (16-byte padded, WMMA-aligned corners).
template <typename S>
struct Layout {
  static constexpr int kPad = 16 / static_cast<int>(sizeof(S));
  static constexpr bool kSpill = !std::is_same<S, float>::value;
  int ld_a, ld_b, ld_z, ld_t, ld_f, ld_u;  // elements
  int pix, z, t, a0, a1, b0, b1, f, u, o, bytes;

  __host__ __device__ Layout(int rsp, int rtp, int halo_cols) {
    const int s = static_cast<int>(sizeof(S));
    const int rows = rsp > rtp ? rsp : rtp;  // rank_gemm runs with rsp rows, then rtp rows
    ld_a = kTileK + kPad;
    ld_b = kTileM + kPad;
    ld_z = halo_cols + kPad;
    ld_t = kTileM + kPad;
    ld_f = kTileM + 4;
    ld_u = rtp + kPad;
    pix = 0;
    z = pix + align128(kTileM * (8 + 4 + 4));
    t = z + align128(rsp * ld_z * s);
    const int work = t + align128(rtp * ld_t * s);
    a0 = work;
    a1 = a0 + align128(rows * ld_a * s);
    b0 = a1 + align128(rows * ld_a * s);
    b1 = b0 + align128(kTileK * ld_b * s);
    const int end1 = b1 + align128(kTileK * ld_b * s);
    f = work;
    const int end_f = kSpill ? f + align128(rows * ld_f * 4) : work;
    u = work;
    o = u + align128(kTileN * ld_u * s);
    const int end2 = o + align128(kTileN * ld_f * 4);
    bytes = end1 > end_f ? end1 : end_f;
    bytes = bytes > end2 ? bytes : end2;
  }
};

template <typename S>
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, Mma<S>::kK, float>;

// acc[i] (rank rows 16i.., this warp's 16 pixel columns) += A @ G, where A is
// rows_pad x (k_steps * kTileK) in global memory (row stride a_ld, zero
// padded) and G is K x kTileM with G[k][m] = gather(k, m). Same pipeline as
// two_stage_kernel's stage 1. Called by all threads; ends with a barrier.
template <typename S, typename Gather>
__device__ __forceinline__ void rank_gemm(FragAcc<S> (&acc)[kMaxRankTiles], int rank_tiles, const S* a_src, int a_ld,
                                          int rows_pad, int k_steps, bool channels_fastest, const Gather& gather,
                                          S* a0, S* a1, S* b0, S* b1, int ld_a, int ld_b) {
  constexpr int KK = Mma<S>::kK;
  using E = typename Mma<S>::Elem;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, KK, E, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, KK, E, wmma::row_major>;
  constexpr bool kTf32 = std::is_same<S, float>::value;
  const int tid = threadIdx.x, warp = tid / 32;
  S staged[kGatherPerThread];

  copy_tile_async(a0, ld_a, a_src, a_ld, rows_pad, kTileK);
#pragma unroll
  for (int i = 0; i < kGatherPerThread; ++i) {
    int kk, m;
    gather_coords(tid + i * kThreads, channels_fastest, kk, m);
    b0[kk * ld_b + m] = gather(kk, m);
  }
  cp_async_wait_all();
  __syncthreads();

  for (int step = 0; step < k_steps; ++step) {
    const int cur = step & 1;
    const bool more = step + 1 < k_steps;
    S* a_cur = cur ? a1 : a0;
    S* b_cur = cur ? b1 : b0;
    S* a_next = cur ? a0 : a1;
    S* b_next = cur ? b0 : b1;
    if (more) {  // buffers *_next were last read in step - 1, before its closing barrier
      const int k0 = (step + 1) * kTileK;
      copy_tile_async(a_next, ld_a, a_src + k0, a_ld, rows_pad, kTileK);
#pragma unroll
      for (int i = 0; i < kGatherPerThread; ++i) {
        int kk, m;
        gather_coords(tid + i * kThreads, channels_fastest, kk, m);
        staged[i] = gather(k0 + kk, m);
      }
    }
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += KK) {
      FragB fb;
      wmma::load_matrix_sync(fb, b_cur + kk * ld_b + warp * 16, ld_b);
      if constexpr (kTf32) round_to_tf32(fb);
#pragma unroll
      for (int i = 0; i < kMaxRankTiles; ++i) {
        if (i < rank_tiles) {
          FragA fa;
          wmma::load_matrix_sync(fa, a_cur + i * 16 * ld_a + kk, ld_a);
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
        b_next[kk * ld_b + m] = staged[i];
      }
      cp_async_wait_all();
    }
    __syncthreads();
  }
}

// dst[r * ld_dst + col0 + m] = acc (rank row r, pixel column m) in the operand
// dtype, through the fp32 buffer f_s (ld_f) for 16-bit types. f_s may alias
// rank_gemm's buffers (it ended with a barrier). Ends with a barrier.
template <typename S>
__device__ __forceinline__ void store_rank_tiles(FragAcc<S> (&acc)[kMaxRankTiles], int rank_tiles, S* dst, int ld_dst,
                                                 int col0, float* f_s, int ld_f) {
  const int tid = threadIdx.x, warp = tid / 32;
  if constexpr (std::is_same<S, float>::value) {
#pragma unroll
    for (int i = 0; i < kMaxRankTiles; ++i) {
      if (i < rank_tiles) {
        wmma::store_matrix_sync(dst + i * 16 * ld_dst + col0 + warp * 16, acc[i], ld_dst, wmma::mem_row_major);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kMaxRankTiles; ++i) {
      if (i < rank_tiles) {
        wmma::store_matrix_sync(f_s + i * 16 * ld_f + warp * 16, acc[i], ld_f, wmma::mem_row_major);
      }
    }
    __syncthreads();
    for (int e = tid; e < rank_tiles * 16 * kTileM; e += kThreads) {
      const int r = e / kTileM, m = e - r * kTileM;
      dst[r * ld_dst + col0 + m] = from_float<S>(f_s[r * ld_f + m]);
    }
  }
  __syncthreads();
}

template <typename S>
__global__ void __launch_bounds__(kThreads) tucker2_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched: the host side requires compute capability 8.0
#else
  constexpr int KK = Mma<S>::kK;
  using E = typename Mma<S>::Elem;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, KK, E, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, KK, E, wmma::row_major>;
  constexpr bool kTf32 = std::is_same<S, float>::value;

  extern __shared__ __align__(128) unsigned char smem[];
  const Layout<S> L(p.rsp, p.rtp, p.halo_cols);
  long long* pix_out = reinterpret_cast<long long*>(smem + L.pix);
  int* pix_hy = reinterpret_cast<int*>(smem + L.pix + kTileM * 8);
  int* pix_hx = pix_hy + kTileM;
  S* z_s = reinterpret_cast<S*>(smem + L.z);
  S* t_s = reinterpret_cast<S*>(smem + L.t);
  S* a0 = reinterpret_cast<S*>(smem + L.a0);
  S* a1 = reinterpret_cast<S*>(smem + L.a1);
  S* b0 = reinterpret_cast<S*>(smem + L.b0);
  S* b1 = reinterpret_cast<S*>(smem + L.b1);
  float* f_s = reinterpret_cast<float*>(smem + L.f);

  const int tid = threadIdx.x, warp = tid / 32;
  const int n = blockIdx.x / p.tiles_per_image;
  const int tile = blockIdx.x - n * p.tiles_per_image;
  const int oy0 = (tile / p.tiles_w) * kTileH, ox0 = (tile - (tile / p.tiles_w) * p.tiles_w) * kTileW;
  const int iy_origin = oy0 * p.stride_h - p.pad_h, ix_origin = ox0 * p.stride_w - p.pad_w;  // halo corner
  const S* x = static_cast<const S*>(p.x) + n * p.sn;
  S* out = static_cast<S*>(p.out);

  for (int m = tid; m < kTileM; m += kThreads) {
    const int my = m / kTileW, mx = m - my * kTileW;
    const int oy = oy0 + my, ox = ox0 + mx;
    pix_out[m] = (oy < p.ho && ox < p.wo) ? n * p.on + oy * p.oh + ox * p.ow : -1;
    pix_hy[m] = my * p.stride_h;
    pix_hx[m] = mx * p.stride_w;
  }
  __syncthreads();

  FragAcc<S> acc[kMaxRankTiles];

  // Stage 0: Z = U_S @ x over the halo, kTileM halo pixels per pass.
  const int rs_tiles = p.rsp / 16;
  for (int hc0 = 0; hc0 < p.halo_cols; hc0 += kTileM) {
#pragma unroll
    for (int i = 0; i < kMaxRankTiles; ++i) wmma::fill_fragment(acc[i], 0.0f);
    auto halo_element = [&](int c, int m) -> S {
      const int hp = hc0 + m;
      if (c >= p.cin || hp >= p.halo_px) return from_float<S>(0.0f);
      const int hy = hp / p.halo_w, hx = hp - hy * p.halo_w;
      const int iy = iy_origin + hy, ix = ix_origin + hx;
      if (iy < 0 || iy >= p.h || ix < 0 || ix >= p.w) return from_float<S>(0.0f);
      return x[c * p.sc + iy * p.sh + ix * p.sw];
    };
    rank_gemm<S>(acc, rs_tiles, static_cast<const S*>(p.usp), p.cin_pad, p.rsp, p.cin_pad / kTileK, p.sc == 1,
                 halo_element, a0, a1, b0, b1, L.ld_a, L.ld_b);
    store_rank_tiles<S>(acc, rs_tiles, z_s, L.ld_z, hc0, f_s, L.ld_f);
  }

  // Stage 1: T = core @ im2col(Z), read from shared memory (pixels fastest:
  // consecutive threads read consecutive halo columns).
  const int rt_tiles = p.rtp / 16;
#pragma unroll
  for (int i = 0; i < kMaxRankTiles; ++i) wmma::fill_fragment(acc[i], 0.0f);
  auto z_element = [&](int k, int m) -> S {
    if (k >= p.k1 || pix_out[m] < 0) return from_float<S>(0.0f);
    const int tap = k / p.rs, r = k - tap * p.rs;
    const int ty = tap / p.kw, tx = tap - ty * p.kw;
    const int hy = pix_hy[m] + ty * p.dil_h, hx = pix_hx[m] + tx * p.dil_w;
    return z_s[r * L.ld_z + hy * p.halo_w + hx];
  };
  rank_gemm<S>(acc, rt_tiles, static_cast<const S*>(p.cp), p.k1_pad, p.rtp, p.k1_pad / kTileK, false, z_element, a0,
               a1, b0, b1, L.ld_a, L.ld_b);
  store_rank_tiles<S>(acc, rt_tiles, t_s, L.ld_t, 0, f_s, L.ld_f);

  // Stage 2: out = bias + U_T @ T, kTileN output channels at a time.
  S* u_s = reinterpret_cast<S*>(smem + L.u);
  float* o_s = reinterpret_cast<float*>(smem + L.o);
  const S* utp = static_cast<const S*>(p.utp);
  const bool out_channels_fastest = p.oc == 1;
  for (int co0 = 0; co0 < p.cout; co0 += kTileN) {
    copy_tile_async(u_s, L.ld_u, utp + static_cast<long long>(co0) * p.rtp, p.rtp, kTileN, p.rtp);
    cp_async_wait_all();
    __syncthreads();
    FragAcc<S> c[kTileN / 16];
#pragma unroll
    for (int j = 0; j < kTileN / 16; ++j) wmma::fill_fragment(c[j], 0.0f);
    for (int k = 0; k < p.rtp; k += KK) {
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
        float v = o_s[j * L.ld_f + m];
        if (p.bias != nullptr) v += p.bias[co];
        out[pix_out[m] + co * p.oc] = from_float<S>(v);
      }
    }
    __syncthreads();  // u_s and o_s are rewritten by the next chunk
  }
#endif
}

// Halo extent of an 8-pixel tile side: the input rows (or columns) its
// receptive fields span.
int64_t halo_extent(int64_t kernel, int64_t stride, int64_t dilation) {
  return (kTileH - 1) * stride + (kernel - 1) * dilation + 1;
}

int smem_bytes(at::ScalarType dtype, int64_t rsp, int64_t rtp, int64_t halo_cols) {
  const int a = static_cast<int>(rsp), b = static_cast<int>(rtp), c = static_cast<int>(halo_cols);
  return dtype == at::kFloat ? Layout<float>(a, b, c).bytes : Layout<__half>(a, b, c).bytes;  // bf16 as fp16
}

template <typename S>
void launch(const Params& p, int64_t blocks, int smem, cudaStream_t stream) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  allow_max_dynamic_smem(reinterpret_cast<const void*>(&tucker2_kernel<S>), device);
  tucker2_kernel<S><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool tucker2_supports(const at::Tensor& input, at::TensorList factors, const Plan& plan, const std::string& kind,
                      std::string* reason) {
  auto no = [&](const char* why) {
    if (reason) *reason = why;
    return false;
  };
  if (kind != "tucker2") return no("not kind tucker2");
  if (!input.is_cuda()) return no("input is not on a CUDA device");
  const auto dtype = input.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16 && dtype != at::kFloat) return no("dtype is not fp16/bf16/fp32");
  if (dtype == at::kFloat && !at::globalContext().allowTF32CuDNN()) return no("fp32 with cudnn.allow_tf32 off");
  const at::Tensor& G = factors[1];
  const int64_t cin = factors[0].size(1);
  if (cin == 0) return no("no input channels");
  const int64_t rsp = round_up(G.size(1), 16), rtp = round_up(G.size(0), 16);
  if (rsp > kMaxRank || rtp > kMaxRank) return no("rank above the fused kernel's limit");
  const ConvParams& cv = plan.stages[1].conv;
  const int64_t halo_h = halo_extent(G.size(2), cv.stride[0], cv.dilation[0]);
  const int64_t halo_w = halo_extent(G.size(3), cv.stride[1], cv.dilation[1]);
  if (halo_h * halo_w > (1 << 16)) return no("halo too large");
  const DeviceInfo dev = device_info(input.device().index());
  if (dev.major < 8) return no("needs compute capability 8.0 or newer");
  if (smem_bytes(dtype, rsp, rtp, round_up(halo_h * halo_w, kTileM)) > dev.smem_optin) return no("shared memory");
  // Per-image indices are 32-bit in the kernel; global offsets are 64-bit.
  const int64_t limit = std::numeric_limits<int>::max() / 4;
  const int64_t reach_h = input.size(2) + 2 * cv.padding[0] + halo_h;
  const int64_t reach_w = input.size(3) + 2 * cv.padding[1] + halo_w;
  if (cin > limit || reach_h > limit || reach_w > limit || factors[2].size(0) > limit ||
      G.size(1) * G.size(2) * G.size(3) > limit) {
    return no("sizes above the 32-bit index range");
  }
  return true;
}

at::Tensor tucker2_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                           const Plan& plan) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(plan.out_shape, input.options().memory_format(output_memory_format(input)));
  const int64_t n = input.size(0);
  if (n == 0) return out;

  const at::Tensor& US = factors[0];
  const at::Tensor& G = factors[1];
  const at::Tensor& UT = factors[2];
  const int64_t rs = US.size(0), cin = US.size(1), rt = G.size(0), kh = G.size(2), kw = G.size(3);
  const int64_t cout = UT.size(0);
  const int64_t rsp = round_up(rs, 16), rtp = round_up(rt, 16), cin_pad = round_up(cin, kTileK);
  const int64_t k1 = kh * kw * rs, k1_pad = round_up(k1, kTileK), cout_pad = round_up(cout, kTileN);
  // Zero-padded, freshly allocated (16-byte aligned rows for cp.async) factors;
  // the core with K1 in (tap, R_S) order to match the gather from Z.
  at::Tensor usp = at::zeros({rsp, cin_pad}, US.options());
  usp.narrow(0, 0, rs).narrow(1, 0, cin).copy_(US);
  at::Tensor cp = at::zeros({rtp, k1_pad}, G.options());
  cp.narrow(0, 0, rt).narrow(1, 0, k1).copy_(G.permute({0, 2, 3, 1}).reshape({rt, k1}));
  at::Tensor utp = at::zeros({cout_pad, rtp}, UT.options());
  utp.narrow(0, 0, cout).narrow(1, 0, rt).copy_(UT);
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();

  const ConvParams& cv = plan.stages[1].conv;
  const int64_t halo_h = halo_extent(kh, cv.stride[0], cv.dilation[0]);
  const int64_t halo_w = halo_extent(kw, cv.stride[1], cv.dilation[1]);
  const int64_t ho = plan.out_shape[2], wo = plan.out_shape[3];
  const int64_t tiles_w = (wo + kTileW - 1) / kTileW, tiles_h = (ho + kTileH - 1) / kTileH;
  Params p{};
  p.x = input.data_ptr();
  p.sc = input.stride(1);
  set_conv_geometry(p, input, plan, cv, kw);
  p.tiles_w = static_cast<int>(tiles_w);
  p.tiles_per_image = static_cast<int>(tiles_w * tiles_h);
  p.halo_w = static_cast<int>(halo_w);
  p.halo_px = static_cast<int>(halo_h * halo_w);
  p.halo_cols = static_cast<int>(round_up(halo_h * halo_w, kTileM));
  p.cin_pad = static_cast<int>(cin_pad);
  p.rs = static_cast<int>(rs);
  p.rsp = static_cast<int>(rsp);
  p.k1 = static_cast<int>(k1);
  p.k1_pad = static_cast<int>(k1_pad);
  p.rtp = static_cast<int>(rtp);
  p.cout = static_cast<int>(cout);
  p.usp = usp.data_ptr();
  p.cp = cp.data_ptr();
  p.utp = utp.data_ptr();
  p.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.on = out.stride(0);
  p.oc = out.stride(1);
  p.oh = out.stride(2);
  p.ow = out.stride(3);

  const int64_t blocks = n * tiles_w * tiles_h;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "hsv::conv2d: fused tucker2 kernel: too many tiles (",
              blocks, ")");
  const int smem = smem_bytes(input.scalar_type(), rsp, rtp, p.halo_cols);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index());
  switch (input.scalar_type()) {
    case at::kHalf:
      launch<__half>(p, blocks, smem, stream);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16>(p, blocks, smem, stream);
      break;
    case at::kFloat:
      launch<float>(p, blocks, smem, stream);
      break;
    default:
      TORCH_CHECK(false, "hsv::conv2d: fused tucker2 kernel called with dtype ", input.scalar_type());
  }
  count_fused_launch();
  return out;
}

}  // namespace cuda
}  // namespace hsv
