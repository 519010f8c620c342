// Hopper path of the fused two-stage forward y = bias + U @ conv(x, V) for
// fp16/bf16 channels_last inputs (see two_stage_mma.h for when it applies).
//
// Why a second NHWC kernel: Nsight Compute on the WMMA kernel (two_stage_nhwc.cu,
// H100, 2026-11-22) showed 4.2 cycles per issued instruction and ~500
// instructions per K step, mostly WMMA fragment loads that every warp repeats
// for a 16-pixel strip, and 9.5% achieved occupancy on small grids. Here:
//   * ldmatrix.x4 + mma.sync.m16n8k16 (fp32 accumulation). A warp owns 16*MI
//     pixels and all rp ranks, so one ldmatrix of V serves MI pixel fragments
//     and one of the gathered input serves rp/8 MMAs.
//   * The intermediate never leaves registers: the m16n8 accumulator layout of
//     two adjacent rank tiles is the m16k16 A-operand layout of stage 2, so the
//     accumulators are rounded to the input dtype (as the composite chain
//     rounds its intermediate) and used as stage 2's A fragments directly.
//   * Split-K inside a cluster of S CTAs that share a pixel tile: each runs
//     stage 1 over 1/S of K, the S fp32 partials are summed through distributed
//     shared memory (every CTA in the same order, so all hold the same T), and
//     CTA s then runs stage 2 for output-channel chunks s, s+S, ...: no
//     atomics, no fp32 output buffer, no repeated stage 2.
// Two ways to bring in the input (the HALO template flag, chosen per launch):
//   * per tap (the WMMA kernel's gather): a K step is 32 or 64 channels of one
//     tap, 16-byte cp.async copies per pixel, zero-filled by the copy for
//     padding taps and pixels past the end;
//   * input blocks: a CTA's pixels are a tile_h x tile_w block of one image; each
//     channel chunk of the input under the block (with its halo) is copied once
//     and all kh * kw taps read it, the tap being one row offset added to every
//     lane's ldmatrix address. Double-buffered: chunk c + 1's block is copied
//     while chunk c's taps run.
// Either way the factor tile streams through a 3- or 4-deep cp.async pipeline
// with one barrier per step.
// Stage 2 walks the output channels in chunks of 64 (Up rows double-buffered by
// cp.async) and writes each warp's rows through a shared-memory staging tile as
// 16-byte stores along the channels.
#include "two_stage_mma.h"

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
#include <utility>
#include <vector>

#include "../env_choice.h"
#include "cuda_impl.h"
#include "two_stage_nhwc.h"
#include "wmma_tiles.cuh"

namespace hsv {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 128;        // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kCoChunk = 64;         // output channels per stage-2 chunk
constexpr int kLdOut = kCoChunk + 8; // 144-byte staging rows, for the same reason
constexpr int kMaxCluster = 8;       // the portable cluster size limit

struct MmaParams {
  const void* x;            // (N, Cin, H, W) with unit channel stride
  long long sn, sh, sw;     // its other strides (elements, multiples of 8)
  int h, w, cin, kw;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int ho, wo;
  long long pixels;         // N * Ho * Wo
  int k;                    // kh * kw * Cin (a multiple of the K step)
  int cout;                 // a multiple of 8
  int cout_pad;             // a multiple of kCoChunk
  const void* vp;           // (rp, k)
  const void* up;           // (cout_pad, rp)
  const float* bias;        // cout floats or nullptr
  void* out;                // channels_last contiguous: pixel p, channel c at p * cout + c
  const void* residual;     // conv2d_epilogue: added to out (its layout), or nullptr
  bool relu;                // conv2d_epilogue: ReLU after the residual
  int steps_per_split;      // K steps per CTA of a cluster
  // Halo tiles (HALO kernels only): a CTA's pixels are a tile_h x tile_w block
  // of one image; tiles_y x tiles_x blocks per image; the input block under it
  // is halo_h x halo_w positions, halo_rows = halo_h * halo_w, one buffer of
  // halo_bytes per channel chunk; taps = kh * kw.
  int tile_h, tile_w, tiles_y, tiles_x;
  int halo_w, halo_rows, halo_bytes, taps;
};

constexpr int cmax(int a, int b) { return a > b ? a : b; }

// Shared memory, one region reused three ways:
//   stage 1   kStages x {Vp tile (rp x KS), gathered tile (kTileM x KS)}
//   split-K   the fp32 partial intermediate in fragment order (kTileM x rp)
//   stage 2   {Up chunk x 2 (64 x rp)} + per-warp output staging (16*MI x 64)
// KS: K per pipeline step, 32 or 64 channels of one tap (64 where Cin allows:
// half the steps, so half the barriers and per-step address work, and twice
// the bytes in flight per stage). Rows of KS + 8 elements (80 or 144 bytes),
// so the 8 rows an ldmatrix reads fall in distinct banks.
template <int RP, int MI, int KS>
struct MmaLayout {
  static constexpr int kStages = KS == 32 ? 4 : 3;  // cp.async pipeline depth
  static constexpr int kLdIn = KS + 8;
  static constexpr int kTileM = 16 * MI * kWarps;
  static constexpr int kA = RP * kLdIn * 2;
  static constexpr int kB = kTileM * kLdIn * 2;
  static constexpr int kStage = kA + kB;
  static constexpr int kPipe = kStages * kStage;
  static constexpr int kPartial = kTileM * RP * 4;
  static constexpr int kLdU = RP + 8;
  static constexpr int kU = tiles::align128(kCoChunk * kLdU * 2);
  static constexpr int kOutWarp = 16 * MI * kLdOut * 2;
  static constexpr int kStage2 = 2 * kU + kWarps * kOutWarp;
  static constexpr int bytes(bool split) { return cmax(kPipe, cmax(split ? kPartial : 0, kStage2)); }
  // HALO kernels: two input blocks of halo_bytes each, then kStages Vp tiles
  static constexpr int halo_bytes(bool split, int halo) {
    return cmax(2 * halo + kStages * kA, cmax(split ? kPartial : 0, kStage2));
  }
};

// The device helpers exist only where the kernel body is compiled (sm_90+).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a (16x16, row) @ b (16x8, col), fp32 accumulators.
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1,
                                         __nv_bfloat16*) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, __half*) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int A, int B>
__device__ __forceinline__ void zero(float (&acc)[A][B][4]) {
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.0f;
}

// Two floats as two 16-bit values in one register, the first in the low half
// (the lower column of an mma fragment).
__device__ __forceinline__ unsigned pack2(float lo, float hi, __half*) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ unsigned pack2(float lo, float hi, __nv_bfloat16*) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

#endif

template <typename S, int RP, int MI, int KS, bool HALO>
__global__ void __launch_bounds__(kThreads) mma_kernel(const MmaParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // never launched: the host side requires compute capability 9.0 (clusters)
#else
  using L = MmaLayout<RP, MI, KS>;
  constexpr int kKStep = KS, kStages = L::kStages, kLdIn = L::kLdIn;
  constexpr int kNj = RP / 8;                  // n8 rank tiles (stage 1)
  constexpr int kKk = RP / 16;                 // k16 rank steps (stage 2)
  constexpr int kWarpM = 16 * MI;
  constexpr int kPieces = L::kTileM / 32;      // gathered pixels per thread and step
  constexpr int kRuns = KS / 32;               // 64-byte runs of channels per pixel and step
  S* const tag = nullptr;

  extern __shared__ __align__(128) unsigned char smem[];
  const unsigned smem0 = smem_addr(smem);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  cg::cluster_group cluster = cg::this_cluster();
  const int splits = static_cast<int>(cluster.num_blocks());
  const int split = static_cast<int>(cluster.block_rank());
  const long long tile = blockIdx.x / splits;
  const long long p0 = tile * L::kTileM;  // without HALO: the tile's first pixel
  const S* x = static_cast<const S*>(p.x);
  const S* vp = static_cast<const S*>(p.vp);
  const S* up = static_cast<const S*>(p.up);

  // HALO: the tile's image and the output position of its block's top-left corner.
  int h_n = 0, h_oy0 = 0, h_ox0 = 0;
  if constexpr (HALO) {
    const int per_image = p.tiles_y * p.tiles_x;
    h_n = static_cast<int>(tile / per_image);
    const int q = static_cast<int>(tile - static_cast<long long>(h_n) * per_image);
    const int ty = q / p.tiles_x;
    h_oy0 = ty * p.tile_h;
    h_ox0 = (q - ty * p.tiles_x) * p.tile_w;
  }
  // A pipeline stage holds the step's Vp tile and, without HALO, its gathered
  // input tile; with HALO the stages follow the two input blocks.
  const int stage_bytes = HALO ? L::kA : L::kStage;
  const unsigned stage0 = HALO ? 2 * p.halo_bytes : 0;

  // Gather pieces (without HALO): pixel j of this thread is pixel tid / 4 + 32 j of the tile;
  // it copies channels 8 * (tid % 4) .. + 8 of each 32 of the step. Per pixel: the offset of
  // the top-left input position of its window (may lie in the padding) and
  // that position; a pixel past the end gets a row no tap can bring in range.
  long long g_off[kPieces];
  int g_iy[kPieces], g_ix[kPieces];
  if constexpr (!HALO) {
#pragma unroll
    for (int j = 0; j < kPieces; ++j) {
      const long long pix = p0 + tid / 4 + 32 * j;
      g_off[j] = 0;
      g_iy[j] = -(1 << 30);
      g_ix[j] = 0;
      if (pix < p.pixels) {
        int n;
        tiles::pixel_origin(p, pix, n, g_iy[j], g_ix[j]);
        g_off[j] = n * p.sn + static_cast<long long>(g_iy[j]) * p.sh + static_cast<long long>(g_ix[j]) * p.sw +
                   (tid % 4) * 8;
      }
    }
  }
  // This thread's Vp pieces: piece i = tid + j * kThreads of the step's
  // RP x KS tile is row i / (KS / 8), 16-byte piece i % (KS / 8); kThreads is a
  // multiple of KS / 8, so the piece column is the same for every j.
  constexpr int kVRow = KS / 8, kVPieces = (RP * kVRow + kThreads - 1) / kThreads;
  constexpr int kVRowsPerJ = kThreads / kVRow;
  const int v_src0 = (tid / kVRow) * p.k + (tid % kVRow) * 8;
  const int v_dst0 = (tid / kVRow) * kLdIn + (tid % kVRow) * 8;

  const int csteps = p.cin / kKStep;
  const int k_steps = p.k / kKStep;
  const int s_begin = split * p.steps_per_split;
  const int nsteps = max(0, min(k_steps, s_begin + p.steps_per_split) - s_begin);

  // The next step to issue. Without HALO steps are tap-major, kept as running
  // (channel, tap) counters so the per-step work has no integer division:
  // channel c0, tap column tx, and the tap's offsets dy, dx in input rows and
  // columns; delta is the step's offset from a pixel's g_off: dy * sh + dx * sw + c0.
  // With HALO steps are channel-chunk-major (every tap of a chunk reads the
  // chunk's input block): step = chunk * taps + tap, and a split's
  // steps_per_split is a whole number of chunks.
  int nx_c0 = 0, nx_tx = 0, nx_dy = 0, nx_dx = 0, nx_t = 0;
  long long nx_delta = 0;
  const S* nx_v;
  if constexpr (HALO) {
    nx_c0 = (s_begin / p.taps) * kKStep;
    nx_v = vp + nx_c0;
  } else {
    const int tap = s_begin / csteps, ty = tap / p.kw;
    nx_c0 = (s_begin - tap * csteps) * kKStep;
    nx_tx = tap - ty * p.kw;
    nx_dy = ty * p.dil_h;
    nx_dx = nx_tx * p.dil_w;
    nx_delta = nx_dy * p.sh + nx_dx * p.sw + nx_c0;
    nx_v = vp + static_cast<long long>(s_begin) * kKStep;
  }
  const long long next_tap_col = p.dil_w * p.sw - p.cin;  // delta's change when the tap moves one column

  // The next step's operands into pipeline stage `stage` (cp.async, not waited for).
  auto issue = [&](int stage) {
    S* a = reinterpret_cast<S*>(smem + stage0 + stage * stage_bytes);
    if constexpr (!HALO) {
      S* b = reinterpret_cast<S*>(smem + stage * L::kStage + L::kA);
#pragma unroll
      for (int j = 0; j < kPieces; ++j) {
        const int iy = g_iy[j] + nx_dy, ix = g_ix[j] + nx_dx;
        const bool ok = static_cast<unsigned>(iy) < static_cast<unsigned>(p.h) &&
                        static_cast<unsigned>(ix) < static_cast<unsigned>(p.w);
        const S* src = x + (g_off[j] + nx_delta);
#pragma unroll
        for (int r = 0; r < kRuns; ++r) {
          // a zero-filled copy reads nothing, but its address must still be valid: x
          tiles::cp_async16_zfill(b + (tid / 4 + 32 * j) * kLdIn + (tid % 4) * 8 + 32 * r, ok ? src + 32 * r : x,
                                  ok);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kVPieces; ++j) {
      if ((RP * kVRow) % kThreads == 0 || tid + j * kThreads < RP * kVRow) {
        tiles::cp_async16(a + v_dst0 + j * kVRowsPerJ * kLdIn, nx_v + v_src0 + j * kVRowsPerJ * p.k);
      }
    }
    if constexpr (HALO) {
      if (++nx_t == p.taps) {  // Vp's K is (tap, channel): the next chunk's first tap
        nx_t = 0;
        nx_c0 += kKStep;
        nx_v = vp + nx_c0;
      } else {
        nx_v += p.cin;
      }
    } else {
      nx_v += kKStep;
      nx_c0 += kKStep;
      nx_delta += kKStep;
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
    }
  };

  // HALO: channels c0 .. c0 + KS of the tile's input block into input buffer
  // `buf`, row hy * halo_w + hx for input position (iy0 + hy, ix0 + hx),
  // zero-filled outside the image.
  auto issue_halo = [&](int c0, int buf) {
    S* dst = reinterpret_cast<S*>(smem + buf * p.halo_bytes);
    const S* img = x + h_n * p.sn + c0;
    const int iy0 = h_oy0 * p.stride_h - p.pad_h, ix0 = h_ox0 * p.stride_w - p.pad_w;
    constexpr int kRowPieces = KS / 8;
    for (int i = tid; i < p.halo_rows * kRowPieces; i += kThreads) {
      const int row = i / kRowPieces, piece = i % kRowPieces;
      const int hy = row / p.halo_w, hx = row - hy * p.halo_w;
      const int iy = iy0 + hy, ix = ix0 + hx;
      const bool ok = static_cast<unsigned>(iy) < static_cast<unsigned>(p.h) &&
                      static_cast<unsigned>(ix) < static_cast<unsigned>(p.w);
      const S* src = img + static_cast<long long>(iy) * p.sh + static_cast<long long>(ix) * p.sw + piece * 8;
      tiles::cp_async16_zfill(dst + row * kLdIn + piece * 8, ok ? src : x, ok);
    }
  };

  // ldmatrix row addresses (bytes). Input (A operand, pixels x K): lanes 0-15
  // rows 0-15 at K 0, lanes 16-31 the same rows at K 8; without HALO from the
  // stage's gathered tile, with HALO from the input block, where pixel (ty, tx)
  // of the tile reads row (ty * stride_h + dy) * halo_w + tx * stride_w + dx at
  // tap offset (dy, dx): the same shift for every lane, so a tap is one added
  // offset (pixel slots past the block read row 0; their outputs are dropped).
  // Vp (B operand, ranks x K): lanes 0-7 ranks 0-7 at K 0, 8-15 ranks 0-7 at K 8,
  // 16-23 ranks 8-15 at K 0, 24-31 ranks 8-15 at K 8, giving b0 b1 of two n8 tiles.
  unsigned off_in[MI];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
    const int r = warp * kWarpM + mi * 16 + lane % 16;
    int row = r;
    if constexpr (HALO) {
      const int ty = r / p.tile_w, tx = r - ty * p.tile_w;
      row = ty < p.tile_h ? ty * p.stride_h * p.halo_w + tx * p.stride_w : 0;
    }
    off_in[mi] = (HALO ? 0 : L::kA) + (row * kLdIn + (lane / 16) * 8) * 2;
  }
  const unsigned off_v = ((lane % 8 + (lane / 16) * 8) * kLdIn + ((lane / 8) % 2) * 8) * 2;
  // HALO: the step's tap as a row offset into the block, its column, its tap
  // index, and which input buffer its chunk is in
  int cur_off = 0, cur_tx = 0, cur_t = 0, cur_buf = 0, cur_chunk = 0;
  const int nchunks = HALO ? nsteps / p.taps : 0;
  const int c_first = HALO ? (s_begin / p.taps) * kKStep : 0;  // the first chunk's channel

  // Stage 1: acc[mi][nj] = the m16n8 tile (pixels 16 mi.., ranks 8 nj..) of T^T.
  // Every thread commits one group per step (empty past the end), so the
  // wait_group counts line up. With HALO the first chunk's block goes out in the
  // first group and chunk c + 1's in the group of step (c, tap 0), which has
  // landed by step (c + 1, 0) because a chunk has taps >= kStages - 1 steps.
  float acc[MI][kNj][4];
  zero(acc);
  if constexpr (HALO) {
    if (nchunks > 0) issue_halo(c_first, 0);
  }
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nsteps) issue(s);
    tiles::cp_async_commit();
  }
  for (int s = 0; s < nsteps; ++s) {
    tiles::cp_async_wait<kStages - 2>();  // step s has landed (this thread's copies) ...
    __syncthreads();                       // ... everyone's, and step s - 1's stage is free
    const unsigned vbase = smem0 + stage0 + (s % kStages) * stage_bytes;
    unsigned abase[MI];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      abase[mi] = HALO ? smem0 + cur_buf * p.halo_bytes + off_in[mi] + cur_off * (kLdIn * 2) : vbase + off_in[mi];
    }
#pragma unroll
    for (int kk = 0; kk < kKStep / 16; ++kk) {
      unsigned af[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) ldmatrix_x4(af[mi], abase[mi] + kk * 32);
#pragma unroll
      for (int nj2 = 0; nj2 < RP / 16; ++nj2) {
        unsigned bf[4];
        ldmatrix_x4(bf, vbase + off_v + (nj2 * 16 * kLdIn + kk * 16) * 2);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          mma16816(acc[mi][2 * nj2], af[mi], bf[0], bf[1], tag);
          mma16816(acc[mi][2 * nj2 + 1], af[mi], bf[2], bf[3], tag);
        }
      }
    }
    // The next copies go out after this step's MMAs are issued: with one or two
    // warps per scheduler on small grids, the address arithmetic then overlaps
    // the tensor cores instead of delaying them (H100 sweep, 2026-11-22: a
    // step cost ~950 cycles whatever its MMA count).
    if constexpr (HALO) {
      // the other buffer held chunk c - 1, whose last step every warp finished before this step's barrier
      if (cur_t == 0 && cur_chunk + 1 < nchunks) issue_halo(c_first + (cur_chunk + 1) * kKStep, cur_buf ^ 1);
    }
    if (s + kStages - 1 < nsteps) issue((s + kStages - 1) % kStages);
    tiles::cp_async_commit();
    if constexpr (HALO) {
      if (++cur_t == p.taps) {
        cur_t = cur_tx = cur_off = 0;
        cur_buf ^= 1;
        ++cur_chunk;
      } else if (++cur_tx == p.kw) {
        cur_tx = 0;
        cur_off += p.dil_h * p.halo_w - (p.kw - 1) * p.dil_w;
      } else {
        cur_off += p.dil_w;
      }
    }
  }
  tiles::cp_async_wait<0>();
  __syncthreads();  // the pipeline's memory is free

  // Split-K: the cluster's partials summed through distributed shared memory.
  // Each thread's accumulators go out as float4s in fragment order, so the
  // same thread of every CTA holds the same elements; every CTA adds them in
  // rank order, so all hold bit-identical sums.
  if (splits > 1) {
    float4* part = reinterpret_cast<float4*>(smem);
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int nj = 0; nj < kNj; ++nj)
        part[(mi * kNj + nj) * kThreads + tid] =
            make_float4(acc[mi][nj][0], acc[mi][nj][1], acc[mi][nj][2], acc[mi][nj][3]);
    cluster.sync();  // every partial written (and visible cluster-wide)
    zero(acc);
    for (int r = 0; r < splits; ++r) {
      const float4* src = cluster.map_shared_rank(part, r);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int nj = 0; nj < kNj; ++nj) {
          const float4 v = src[(mi * kNj + nj) * kThreads + tid];
          acc[mi][nj][0] += v.x;
          acc[mi][nj][1] += v.y;
          acc[mi][nj][2] += v.z;
          acc[mi][nj][3] += v.w;
        }
    }
    cluster.sync();  // nobody reads a partial any more: the memory is free again
  }

  // T^T rounded to the input dtype, as stage 2's A fragments: the m16k16
  // A tile of ranks 16 kk.. is the accumulators of rank tiles 2 kk, 2 kk + 1.
  unsigned ta[MI][kKk][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int kk = 0; kk < kKk; ++kk) {
      ta[mi][kk][0] = pack2(acc[mi][2 * kk][0], acc[mi][2 * kk][1], tag);
      ta[mi][kk][1] = pack2(acc[mi][2 * kk][2], acc[mi][2 * kk][3], tag);
      ta[mi][kk][2] = pack2(acc[mi][2 * kk + 1][0], acc[mi][2 * kk + 1][1], tag);
      ta[mi][kk][3] = pack2(acc[mi][2 * kk + 1][2], acc[mi][2 * kk + 1][3], tag);
    }

  // Stage 2: output channels in chunks of 64; this CTA takes chunks split,
  // split + splits, ... Up rows (B operand, channels x ranks) as for Vp.
  S* const out_s = reinterpret_cast<S*>(smem + 2 * L::kU + warp * L::kOutWarp);
  const unsigned off_u = ((lane % 8 + (lane / 16) * 8) * L::kLdU + ((lane / 8) % 2) * 8) * 2;
  auto issue_u = [&](int chunk, int buf) {
    S* dst = reinterpret_cast<S*>(smem + buf * L::kU);
    const S* src = up + static_cast<long long>(chunk) * kCoChunk * RP;
#pragma unroll
    for (int i = tid; i < kCoChunk * RP / 8; i += kThreads) {
      const int row = i / (RP / 8), piece = i % (RP / 8);
      tiles::cp_async16(dst + row * L::kLdU + piece * 8, src + row * RP + piece * 8);
    }
  };
  const int chunks = p.cout_pad / kCoChunk;
  if (split < chunks) issue_u(split, 0);
  tiles::cp_async_commit();
  int it = 0;
  for (int c = split; c < chunks; c += splits, ++it) {
    if (c + splits < chunks) {
      issue_u(c + splits, (it + 1) & 1);  // that buffer was last read in the previous chunk, before its barrier
      tiles::cp_async_commit();
      tiles::cp_async_wait<1>();
    } else {
      tiles::cp_async_wait<0>();
    }
    __syncthreads();
    const unsigned ubase = smem0 + (it & 1) * L::kU + off_u;
    float o[MI][kCoChunk / 8][4];
    zero(o);
#pragma unroll
    for (int kk = 0; kk < kKk; ++kk)
#pragma unroll
      for (int nj2 = 0; nj2 < kCoChunk / 16; ++nj2) {
        unsigned bf[4];
        ldmatrix_x4(bf, ubase + (nj2 * 16 * L::kLdU + kk * 16) * 2);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          mma16816(o[mi][2 * nj2], ta[mi][kk], bf[0], bf[1], tag);
          mma16816(o[mi][2 * nj2 + 1], ta[mi][kk], bf[2], bf[3], tag);
        }
      }
    // bias, round, into the warp's staging rows ...
#pragma unroll
    for (int nj = 0; nj < kCoChunk / 8; ++nj) {
      const int col = nj * 8 + 2 * t4, co = c * kCoChunk + col;
      const float b0 = (p.bias != nullptr && co < p.cout) ? p.bias[co] : 0.0f;
      const float b1 = (p.bias != nullptr && co + 1 < p.cout) ? p.bias[co + 1] : 0.0f;
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int row = mi * 16 + g;
        *reinterpret_cast<unsigned*>(out_s + row * kLdOut + col) = pack2(o[mi][nj][0] + b0, o[mi][nj][1] + b1, tag);
        *reinterpret_cast<unsigned*>(out_s + (row + 8) * kLdOut + col) =
            pack2(o[mi][nj][2] + b0, o[mi][nj][3] + b1, tag);
      }
    }
    __syncwarp();
    // ... and out as 16-byte stores: 8 lanes cover one pixel's 64 channels.
#pragma unroll
    for (int e = lane; e < kWarpM * (kCoChunk / 8); e += 32) {
      const int row = e / (kCoChunk / 8), piece = e % (kCoChunk / 8);
      long long pix = p0 + warp * kWarpM + row;
      bool in = pix < p.pixels;
      if constexpr (HALO) {  // slot r of the block is pixel (oy0 + r / tile_w, ox0 + r % tile_w) of image n
        const int r = warp * kWarpM + row, ty = r / p.tile_w, oy = h_oy0 + ty, ox = h_ox0 + r - ty * p.tile_w;
        in = ty < p.tile_h && oy < p.ho && ox < p.wo;
        pix = (static_cast<long long>(h_n) * p.ho + oy) * p.wo + ox;
      }
      const int co = c * kCoChunk + piece * 8;
      if (in && co < p.cout) {
        const long long at = pix * p.cout + co;
        const S* res = p.residual != nullptr ? static_cast<const S*>(p.residual) + at : nullptr;
        *reinterpret_cast<uint4*>(static_cast<S*>(p.out) + at) =
            tiles::tail8<S>(*reinterpret_cast<const uint4*>(out_s + row * kLdOut + piece * 8), res, p.relu);
      }
    }
    __syncthreads();  // the Up buffer (refilled next chunk) and the staging rows are free
  }
#endif
}

// ---------------------------------------------------------------------------
// Host side.

using KernelFn = void (*)(const MmaParams);

struct Variant {
  KernelFn fn = nullptr;
  int bytes_single = 0;
  int bytes_split = 0;
  int (*halo_bytes)(bool split, int halo) = nullptr;  // HALO kernels: shared memory for a block of `halo` bytes
  int stages = 0;
};

template <typename S, int RP, int MI, int KS>
Variant variant(bool halo) {
  using L = MmaLayout<RP, MI, KS>;
  return Variant{halo ? &mma_kernel<S, RP, MI, KS, true> : &mma_kernel<S, RP, MI, KS, false>, L::bytes(false),
                 L::bytes(true), &L::halo_bytes, L::kStages};
}

template <typename S, int RP>
Variant pick_mi_ks(int mi, int ks, bool halo) {
  if (mi == 2) return ks == 64 ? variant<S, RP, 2, 64>(halo) : variant<S, RP, 2, 32>(halo);
  return ks == 64 ? variant<S, RP, 1, 64>(halo) : variant<S, RP, 1, 32>(halo);
}

// The instantiated (rp, MI, KS): MI = 1 or 2 pixel fragments per warp (MI = 4
// was never the best on the H100 sweep), K steps of 32 or 64; each with and
// without input blocks (HALO).
template <typename S>
Variant pick(int64_t rp, int mi, int ks, bool halo) {
  switch (rp) {
    case 16: return pick_mi_ks<S, 16>(mi, ks, halo);
    case 32: return pick_mi_ks<S, 32>(mi, ks, halo);
    case 64: return pick_mi_ks<S, 64>(mi, ks, halo);
    default: return pick_mi_ks<S, 128>(mi, ks, halo);
  }
}

// A HALO kernel's pixel block: tile_h x tile_w output positions of one image in
// tile_m pixel slots, and the input block under it.
struct Block {
  int tile_h = 0, tile_w = 0, tiles_y = 0, tiles_x = 0, halo_w = 0, halo_rows = 0;
  int64_t tiles_per_image() const { return static_cast<int64_t>(tiles_y) * tiles_x; }
};

// The block shape with the fewest blocks per image (idle slots cost MMAs),
// then the smallest input block (its rows are loaded once per channel chunk).
// Blocks of a row are balanced: 28 columns in two blocks are 14 + 14, not 16 + 12.
Block choose_block(int ho, int wo, int tile_m, int kh, int kw, int sh, int sw, int dh, int dw) {
  Block best;
  int64_t best_tiles = 0, best_rows = 0;
  for (int nx = 1; nx <= wo; ++nx) {
    const int tw = (wo + nx - 1) / nx;
    if (nx > 1 && (wo + nx - 2) / (nx - 1) == tw) continue;  // same width as fewer blocks
    const int th_max = std::min(ho, tile_m / tw);
    if (th_max == 0) continue;
    const int ny = (ho + th_max - 1) / th_max, th = (ho + ny - 1) / ny;
    const int halo_w = (tw - 1) * sw + (kw - 1) * dw + 1, halo_h = (th - 1) * sh + (kh - 1) * dh + 1;
    const int64_t tiles = static_cast<int64_t>(nx) * ny, rows = static_cast<int64_t>(halo_w) * halo_h;
    if (best.tile_w == 0 || tiles < best_tiles || (tiles == best_tiles && rows < best_rows)) {
      best = Block{th, tw, ny, nx, halo_w, static_cast<int>(rows)};
      best_tiles = tiles;
      best_rows = rows;
    }
  }
  return best;
}

std::atomic<int64_t> last_mi{0}, last_splits{0}, last_tiles{0}, last_ks{0}, last_halo{0}, last_tile_h{0},
    last_tile_w{0};

}  // namespace

std::vector<int64_t> mma_last_config() {
  return {last_mi.load(), last_splits.load(), last_tiles.load(), last_ks.load(),
          last_halo.load(), last_tile_h.load(), last_tile_w.load()};
}

bool mma_selected(const at::Tensor& input) {
  if (nhwc_kernel_from_env() == NhwcKernel::Wmma) return false;
  return tiles::device_info(input.device().index()).major >= 9;
}

at::Tensor mma_forward(const at::Tensor& input, const at::Tensor& vp, const at::Tensor& up, const at::Tensor& bias_f,
                       const Plan& plan, int64_t kh, int64_t kw, int64_t cout, const Tail& tail) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(plan.out_shape, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t n = input.size(0);
  if (n == 0) return out;
  TORCH_CHECK(out.is_contiguous(at::MemoryFormat::ChannelsLast), "hsv::conv2d: mma kernel: output layout");
  const int64_t cin = input.size(1), rp = vp.size(0), k = kh * kw * cin;
  tiles::check_packed_factors(vp, up, k, kCoChunk, "mma kernel");
  MmaParams p{};
  tiles::set_two_stage_operands(p, input, vp, up, bias_f, out, plan, k, kw, cout);
  const bool tail_in_stores = tail.fits_stores_of(out);
  if (tail_in_stores) tiles::set_tail(p, tail.residual_data(), tail.relu);

  const bool half = input.scalar_type() == at::kHalf;
  const int device = input.device().index();
  const int64_t sms = tiles::device_info(device).sms;
  const int ks = mma_k_step(cin);
  // Input blocks (HALO): a CTA's pixels are a block of one image, and each
  // channel chunk of the input under it is loaded once and read by every tap,
  // where the per-tap gather loads each input position kh * kw times (through
  // L1, but on the H100 the gather of a 64-channel 3x3 layer moved ~5.6 TB/s
  // from L2, its bound). For kernels with >= 4 taps (a chunk then spans enough
  // pipeline steps for its block to land) whose block fits shared memory.
  // HSV_CUDA_MMA_HALO = auto | 0 | 1 (1: wherever it applies). auto, from the
  // H100 sweep of the layer suite (2026-11-22, bench/cuda_nhwc_sweep.py
  // --halo-off): stride 1 with at least as many 128-slot blocks as SMs. There
  // blocks took 0.73-0.93 of the per-tap gather's time (VGG-16 features.2 and
  // .19, ResNet-18 layer1/layer2 at batch 32); with fewer blocks the split-K
  // that whole chunks allow is coarser (0.97-1.46x), and at stride 2 the block
  // holds 4x the pixels' input for 9 taps (1.25-1.38x).
  const int taps = static_cast<int>(kh * kw);
  const int64_t halo_env = env_choice("HSV_CUDA_MMA_HALO", {"auto", "0", "1"});
  const int ho = static_cast<int>(plan.out_shape[2]), wo = static_cast<int>(plan.out_shape[3]);
  // The block shapes for MI = 1 and 2, each chosen once per call (choose_block
  // walks every block width of an output row: about 1 us at 224 columns), and
  // only where input blocks can apply.
  const bool may_halo = halo_env != 1 && taps >= 4;
  Block blocks[3];  // by MI
  for (int m = 1; m <= 2 && may_halo; ++m) {
    blocks[m] = choose_block(ho, wo, 16 * m * kWarps, static_cast<int>(kh), static_cast<int>(kw), p.stride_h,
                             p.stride_w, p.dil_h, p.dil_w);
  }
  auto halo_bytes_of = [&](const Block& b) { return tiles::align128(b.halo_rows * (ks + 8) * 2); };
  auto halo_fits = [&](int m) {
    const Variant v = half ? pick<__half>(rp, m, ks, true) : pick<__nv_bfloat16>(rp, m, ks, true);
    return blocks[m].halo_rows > 0 && taps >= v.stages - 1 &&
           v.halo_bytes(true, halo_bytes_of(blocks[m])) <= 200 * 1024;
  };
  const bool halo = may_halo && halo_fits(1) && halo_fits(2) &&
                    (halo_env == 2 || (p.stride_h == 1 && p.stride_w == 1 && n * blocks[2].tiles_per_image() >= sms));
  auto tiles_for = [&](int mi) -> int64_t {  // CTAs per split: MmaLayout::kTileM pixel slots each
    if (halo) return n * blocks[mi].tiles_per_image();
    const int64_t tile_m = 16 * mi * kWarps;
    return (p.pixels + tile_m - 1) / tile_m;
  };

  // Tiles and split from an H100 sweep of every (MI, S) on the layer suite
  // (bench/cuda_nhwc_sweep.py --sweep, 2026-11-22): two pixel fragments per
  // warp (128-pixel tiles) were best or within 5% wherever they still made
  // half as many tiles as SMs; below that MI = 1. Split-K helped only while
  // the tiles did not cover the SMs, and each extra cluster CTA re-reads every
  // partial (the reduction moves S^2 partials per tile), so S stays <= 4:
  // the smallest power of two that covers the SMs.
  int mi = static_cast<int>(env_choice("HSV_CUDA_MMA_MI", {"auto", "1", "2"}));  // the position is the value
  if (mi == 0) mi = tiles_for(2) * 2 >= sms ? 2 : 1;
  const Variant v = half ? pick<__half>(rp, mi, ks, halo) : pick<__nv_bfloat16>(rp, mi, ks, halo);
  const int64_t tiles = tiles_for(mi);
  // A split takes whole K steps; with HALO whole channel chunks (all taps of each).
  const int64_t unit = halo ? taps : 1, units = k / ks / unit;
  int64_t splits = split_k_from_env();
  if (splits == 0) {
    splits = 1;
    while (splits < 4 && tiles * splits < sms && units * unit / (2 * splits) >= 4 && units >= 2 * splits) splits *= 2;
  }
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, units, kMaxCluster}));
  const int64_t units_per_split = (units + splits - 1) / splits;
  p.steps_per_split = static_cast<int>(units_per_split * unit);
  splits = (units + units_per_split - 1) / units_per_split;  // no CTA without K steps
  TORCH_CHECK(tiles * splits <= std::numeric_limits<int>::max(), "hsv::conv2d: mma kernel: too many pixel tiles");

  int bytes = splits > 1 ? v.bytes_split : v.bytes_single;
  Block blk;
  if (halo) {
    blk = blocks[mi];
    p.tile_h = blk.tile_h;
    p.tile_w = blk.tile_w;
    p.tiles_y = blk.tiles_y;
    p.tiles_x = blk.tiles_x;
    p.halo_w = blk.halo_w;
    p.halo_rows = blk.halo_rows;
    p.halo_bytes = halo_bytes_of(blk);
    p.taps = taps;
    bytes = v.halo_bytes(splits > 1, p.halo_bytes);
  }
  tiles::launch_in_clusters(v.fn, p, tiles * splits, kThreads, bytes, splits, device);
  if (!tail_in_stores) epilogue_pass_(out, tail);
  last_mi.store(mi);
  last_splits.store(splits);
  last_tiles.store(tiles);
  last_ks.store(ks);
  last_halo.store(halo ? 1 : 0);
  last_tile_h.store(blk.tile_h);
  last_tile_w.store(blk.tile_w);
  return out;
}

}  // namespace cuda
}  // namespace hsv
