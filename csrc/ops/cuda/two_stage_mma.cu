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
// The gather is the WMMA kernel's: a K step is 32 channels of one tap, four
// 16-byte cp.async copies per pixel, zero-filled by the copy for padding taps
// and pixels past the end; a 4-deep cp.async pipeline with one barrier per step.
// Stage 2 walks the output channels in chunks of 64 (Up rows double-buffered by
// cp.async) and writes each warp's rows through a shared-memory staging tile as
// 16-byte stores along the channels.
#include "two_stage_mma.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
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
  int steps_per_split;      // K steps per CTA of a cluster
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

template <typename S, int RP, int MI, int KS>
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
  const long long p0 = static_cast<long long>(blockIdx.x / splits) * L::kTileM;
  const S* x = static_cast<const S*>(p.x);
  const S* vp = static_cast<const S*>(p.vp);
  const S* up = static_cast<const S*>(p.up);

  // Gather pieces: pixel j of this thread is pixel tid / 4 + 32 j of the tile;
  // it copies channels 8 * (tid % 4) .. + 8 of each 32 of the step. Per pixel: the offset of
  // the top-left input position of its window (may lie in the padding) and
  // that position; a pixel past the end gets a row no tap can bring in range.
  long long g_off[kPieces];
  int g_iy[kPieces], g_ix[kPieces];
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

  // The next step to issue, kept as running (channel, tap) counters so the
  // per-step work has no integer division: channel c0, tap column tx, and the
  // tap's offsets dy, dx in input rows and columns.
  // delta is the step's offset from a pixel's g_off: dy * sh + dx * sw + c0.
  int nx_c0, nx_tx, nx_dy, nx_dx;
  long long nx_delta;
  {
    const int tap = s_begin / csteps, ty = tap / p.kw;
    nx_c0 = (s_begin - tap * csteps) * kKStep;
    nx_tx = tap - ty * p.kw;
    nx_dy = ty * p.dil_h;
    nx_dx = nx_tx * p.dil_w;
    nx_delta = nx_dy * p.sh + nx_dx * p.sw + nx_c0;
  }
  const long long next_tap_col = p.dil_w * p.sw - p.cin;  // delta's change when the tap moves one column
  const S* nx_v = vp + static_cast<long long>(s_begin) * kKStep;

  // The next step's operands into pipeline stage `stage` (cp.async, not waited for).
  auto issue = [&](int stage) {
    S* a = reinterpret_cast<S*>(smem + stage * L::kStage);
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
        tiles::cp_async16_zfill(b + (tid / 4 + 32 * j) * kLdIn + (tid % 4) * 8 + 32 * r, ok ? src + 32 * r : x, ok);
      }
    }
#pragma unroll
    for (int j = 0; j < kVPieces; ++j) {
      if ((RP * kVRow) % kThreads == 0 || tid + j * kThreads < RP * kVRow) {
        tiles::cp_async16(a + v_dst0 + j * kVRowsPerJ * kLdIn, nx_v + v_src0 + j * kVRowsPerJ * p.k);
      }
    }
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
  };

  // ldmatrix row addresses (bytes from a stage's base). Input (A operand, pixels
  // x K): lanes 0-15 rows 0-15 at K 0, lanes 16-31 the same rows at K 8. Vp (B
  // operand, ranks x K): lanes 0-7 ranks 0-7 at K 0, 8-15 ranks 0-7 at K 8,
  // 16-23 ranks 8-15 at K 0, 24-31 ranks 8-15 at K 8, giving b0 b1 of two n8 tiles.
  const unsigned off_in = L::kA + ((warp * kWarpM + lane % 16) * kLdIn + (lane / 16) * 8) * 2;
  const unsigned off_v = ((lane % 8 + (lane / 16) * 8) * kLdIn + ((lane / 8) % 2) * 8) * 2;

  // Stage 1: acc[mi][nj] = the m16n8 tile (pixels 16 mi.., ranks 8 nj..) of T^T.
  // Every thread commits one group per step (empty past the end), so the
  // wait_group counts line up.
  float acc[MI][kNj][4];
  zero(acc);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nsteps) issue(s);
    tiles::cp_async_commit();
  }
  for (int s = 0; s < nsteps; ++s) {
    tiles::cp_async_wait<kStages - 2>();  // step s has landed (this thread's copies) ...
    __syncthreads();                       // ... everyone's, and step s - 1's stage is free
    const unsigned base = smem0 + (s % kStages) * L::kStage;
#pragma unroll
    for (int kk = 0; kk < kKStep / 16; ++kk) {
      unsigned af[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) ldmatrix_x4(af[mi], base + off_in + (mi * 16 * kLdIn + kk * 16) * 2);
#pragma unroll
      for (int nj2 = 0; nj2 < RP / 16; ++nj2) {
        unsigned bf[4];
        ldmatrix_x4(bf, base + off_v + (nj2 * 16 * kLdIn + kk * 16) * 2);
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
    if (s + kStages - 1 < nsteps) issue((s + kStages - 1) % kStages);
    tiles::cp_async_commit();
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
      const long long pix = p0 + warp * kWarpM + row;
      const int co = c * kCoChunk + piece * 8;
      if (pix < p.pixels && co < p.cout) {
        *reinterpret_cast<uint4*>(static_cast<S*>(p.out) + pix * p.cout + co) =
            *reinterpret_cast<const uint4*>(out_s + row * kLdOut + piece * 8);
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
};

template <typename S, int RP, int MI, int KS>
Variant variant() {
  using L = MmaLayout<RP, MI, KS>;
  return Variant{&mma_kernel<S, RP, MI, KS>, L::bytes(false), L::bytes(true)};
}

template <typename S, int RP>
Variant pick_mi_ks(int mi, int ks) {
  if (mi == 2) return ks == 64 ? variant<S, RP, 2, 64>() : variant<S, RP, 2, 32>();
  return ks == 64 ? variant<S, RP, 1, 64>() : variant<S, RP, 1, 32>();
}

// The instantiated (rp, MI, KS): MI = 1 or 2 pixel fragments per warp (MI = 4
// was never the best on the H100 sweep), K steps of 32 or 64.
template <typename S>
Variant pick(int64_t rp, int mi, int ks) {
  switch (rp) {
    case 16: return pick_mi_ks<S, 16>(mi, ks);
    case 32: return pick_mi_ks<S, 32>(mi, ks);
    case 64: return pick_mi_ks<S, 64>(mi, ks);
    default: return pick_mi_ks<S, 128>(mi, ks);
  }
}

std::atomic<int64_t> last_mi{0}, last_splits{0}, last_tiles{0}, last_ks{0};

}  // namespace

std::vector<int64_t> mma_last_config() {
  return {last_mi.load(), last_splits.load(), last_tiles.load(), last_ks.load()};
}

bool mma_selected(const at::Tensor& input) {
  if (env_choice("HSV_CUDA_NHWC", {"auto", "mma", "wmma"}) == 2) return false;
  return tiles::device_info(input.device().index()).major >= 9;
}

at::Tensor mma_forward(const at::Tensor& input, const at::Tensor& vp, const at::Tensor& up, const at::Tensor& bias_f,
                       const Plan& plan, int64_t kh, int64_t kw, int64_t cout) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(plan.out_shape, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t n = input.size(0);
  if (n == 0) return out;
  TORCH_CHECK(out.is_contiguous(at::MemoryFormat::ChannelsLast), "hsv::conv2d: mma kernel: output layout");
  const int64_t cin = input.size(1), rp = vp.size(0), k = kh * kw * cin;
  TORCH_CHECK((rp == 16 || rp == 32 || rp == 64 || rp == 128) && vp.size(1) == k && up.size(1) == rp &&
                  up.size(0) % kCoChunk == 0 && vp.is_contiguous() && up.is_contiguous(),
              "hsv::conv2d: mma kernel: packed factors of the wrong shape");
  TORCH_CHECK(rp * k <= std::numeric_limits<int>::max(),
              "hsv::conv2d: mma kernel: factor too large for 32-bit offsets");
  MmaParams p{};
  p.x = input.data_ptr();
  tiles::set_conv_geometry(p, input, plan, plan.stages[0].conv, kw);
  p.pixels = n * plan.out_shape[2] * plan.out_shape[3];
  p.k = static_cast<int>(k);
  p.cout = static_cast<int>(cout);
  p.cout_pad = static_cast<int>(up.size(0));
  p.vp = vp.data_ptr();
  p.up = up.data_ptr();
  p.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();

  const bool half = input.scalar_type() == at::kHalf;
  const int device = input.device().index();
  const int64_t sms = tiles::device_info(device).sms;
  // K step: 64 channels where Cin allows (HSV_CUDA_MMA_KSTEP = 32 or 64 forces it; 64 needs Cin % 64 == 0)
  constexpr int kKSteps[] = {0, 32, 64};
  int ks = kKSteps[env_choice("HSV_CUDA_MMA_KSTEP", {"auto", "32", "64"})];
  if (ks == 0 || cin % ks != 0) ks = cin % 64 == 0 ? 64 : 32;
  auto variant_for = [&](int mi) { return half ? pick<__half>(rp, mi, ks) : pick<__nv_bfloat16>(rp, mi, ks); };
  auto tiles_for = [&](int mi) {  // MmaLayout::kTileM pixels per CTA
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
  const Variant v = variant_for(mi);
  const int64_t tiles = tiles_for(mi);
  const int64_t k_steps = k / ks;
  int64_t splits = split_k_from_env();
  if (splits == 0) {
    splits = 1;
    while (splits < 4 && tiles * splits < sms && k_steps / (2 * splits) >= 4) splits *= 2;
  }
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, k_steps, kMaxCluster}));
  p.steps_per_split = static_cast<int>((k_steps + splits - 1) / splits);
  splits = (k_steps + p.steps_per_split - 1) / p.steps_per_split;  // no CTA without K steps
  TORCH_CHECK(tiles * splits <= std::numeric_limits<int>::max(), "hsv::conv2d: mma kernel: too many pixel tiles");

  const int bytes = splits > 1 ? v.bytes_split : v.bytes_single;
  tiles::allow_max_dynamic_smem(reinterpret_cast<const void*>(v.fn), device);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(tiles * splits));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(bytes);
  cfg.stream = c10::cuda::getCurrentCUDAStream(device);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(splits);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, v.fn, p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  last_mi.store(mi);
  last_splits.store(splits);
  last_tiles.store(tiles);
  last_ks.store(ks);
  return out;
}

}  // namespace cuda
}  // namespace hsv
