// Register-blocked GEMM microkernels for the fused CPU convs, one per ISA.
//
// Every kernel computes an MR x NR block of C:
//   C[i][j] = C0[i][j] + sum_{k < K} a[i][k * ka] * b[k * NR + j]      i < MR, j < NR
// where C0 is C itself (accumulate), else the row init[0..NR) for every i
// (e.g. the bias), else zero.
// a is "indirect": one row pointer per output row, so the im2col panel of a
// conv is never built; a row that falls into the padding points at zeros.
// ka is the distance between a row's consecutive elements (1 for NHWC input,
// H*W for NCHW): all rows share it, so it costs one add per k step.
// b is a packed panel (K x NR, row-major), zero-filled past the real columns.
// The caller always passes MR rows (spare rows point at zeros or scratch) and
// an ldc that holds NR columns, so the kernels have no edge cases.
#pragma once

#include <cstdint>

namespace hsv {
namespace cpu {

using MicrokernelFn = void (*)(int64_t K, const float* const* a, int64_t ka, const float* b, float* c,
                               int64_t ldc, bool accumulate, const float* init);

// An MR x NR block of C = A @ B with A packed and B read in place:
//   C[i][j] = sum_{k < K} a[k * MR + i] * b[k * ldb + j]      i < MR, j < NR
// For GEMMs whose B is a block of NCHW planes (ldb = the plane stride): the
// kernel loads NR pixels of each plane where they lie instead of from a
// copied panel. While it runs it prefetches the lines at pf + k * ldb for
// every k (pf may be nullptr): the caller points pf at the next block it will
// read, so that memory time overlaps the FMAs instead of stalling them.
using MicrokernelStridedFn = void (*)(int64_t K, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc,
                                      const float* pf);

// An MR x NR block of C = A @ B with A packed and each row of B found by pointer:
//   C[i][j] = sum_{k < K} a[k * MR + i] * b[k][boff + j]      i < MR, j < NR
// For convs whose pixels are the vector axis (im2col_panels.cpp): row k
// is one (channel, tap)'s run of input pixels, so the im2col panel is read
// where it lies and never copied; boff walks one row list along an output row.
using MicrokernelBRowsFn = void (*)(int64_t K, const float* a, const float* const* b, int64_t boff, float* c,
                                    int64_t ldc);

// MicrokernelFn over `taps` K-slices with their own row pointers, C kept in
// registers across them:
//   C[i][j] = C0[i][j] + sum_{t < taps} sum_{k < K} a[t * MR + i][k * ka] * b[(t * K + k) * NR + j]
// For implicit-im2col convs: slice t is one kernel tap's channels, so one
// call covers several taps where one call per tap reloaded and stored C.
using MicrokernelTapsFn = void (*)(int64_t taps, int64_t K, const float* const* a, int64_t ka, const float* b,
                                   float* c, int64_t ldc, bool accumulate, const float* init);

// Per-channel weighted sums of `taps` rows over npix pixels (a depthwise
// conv's inner loop, with channels as the vector axis):
//   y[p*ys + c] = sum_{t < taps, x[t] != nullptr} w[t][c] * x[t][p*xs + c]      p < npix, c < C
// A null row is a padding tap and is skipped; with none left y is zero.
using DepthwiseFn = void (*)(int64_t C, int64_t npix, int64_t taps, const float* const* x, int64_t xs,
                             const float* const* w, float* y, int64_t ys);

// Plane-major to pixel-major (e.g. an NCHW block to NHWC):
//   dst[p * dst_ps + c] = src[c * src_cs + p]      c < C, p < npix
// src's pixels are contiguous within each channel plane. The vector kernels
// transpose 16 x 16 (8 x 8) blocks in registers, so every source line is read
// whole and every store is a vector; the strided scalar copy this replaces
// cost 3-4 cycles per float (perf: 7-18% of a 3x3 NCHW layer's time).
using ToPixelMajorFn = void (*)(int64_t C, int64_t npix, const float* src, int64_t src_cs, float* dst,
                                int64_t dst_ps);

struct Microkernel {
  const char* isa;  // "avx512", "avx2" or "scalar"
  int mr;
  int nr;
  MicrokernelFn fn;
  // Same ISA and MR, half the NR: for GEMMs whose N (the rank, or Cout) would
  // be mostly padding in NR-wide panels. nullptr when there is none.
  const Microkernel* narrow;
  // The same ISA's depthwise row kernel (see DepthwiseFn).
  DepthwiseFn depthwise;
  // The same ISA's plane-major to pixel-major copy (see ToPixelMajorFn).
  ToPixelMajorFn to_pixel_major;
  // Three vectors per row with fewer rows (a different MR): for GEMMs whose N
  // lies in (NR, 1.5 NR], where the narrow kernel would otherwise run and load
  // one B vector and MR broadcasts per MR FMAs. Only for callers that take
  // their row blocks from the kernel's own MR. nullptr when there is none.
  const Microkernel* three = nullptr;
  // This kernel's MR x NR block with A packed and B strided (see
  // MicrokernelStridedFn); set on the wide kernels only.
  MicrokernelStridedFn strided = nullptr;
  // The same with fewer rows (strided_short_mr) and the same NR: for GEMMs
  // whose row count pads less to it (a rank of 16 or 40 is 24 or 48 rows on a
  // 12-row kernel, 16 or 40 on an 8-row one). nullptr when there is none.
  MicrokernelStridedFn strided_short = nullptr;
  int strided_short_mr = 0;
  // The same blocks with B's rows by pointer (see MicrokernelBRowsFn), MR and
  // strided_short_mr rows; set on the wide kernels only, b_rows_short wherever
  // strided_short is (packed_a_rows picks them together).
  MicrokernelBRowsFn b_rows = nullptr;
  MicrokernelBRowsFn b_rows_short = nullptr;
  // fn over several taps (see MicrokernelTapsFn); nullptr when there is none.
  MicrokernelTapsFn taps = nullptr;
};

// A GEMM with A packed in row blocks (the strided and b_rows kernels): the
// block height and kernels for `rows` rows of A. The short kernels where they
// save at least a tenth of the padded rows, else MR: each row block is one
// more pass over B, and a rank of 80 (84 rows on 12, 80 on 8) ran 4-6% faster
// on 12 rows (1024 -> 512 at 14x14, batch 8, 1 thread), where 16 and 40 (24
// and 48 rows on 12) ran 4-17% faster on 8.
struct PackedARows {
  int64_t mr;
  MicrokernelStridedFn strided;
  MicrokernelBRowsFn b_rows;
};
PackedARows packed_a_rows(const Microkernel& uk, int64_t rows);

// The kernel for a GEMM with n output columns: uk, or its narrow variant when
// padding n to uk's NR would waste a quarter or more of the work; with any_mr,
// its three-vector variant (another MR) in place of the narrow one where n > NR.
const Microkernel& microkernel_for_width(const Microkernel& uk, int64_t n, bool any_mr = false);

// nullptr when this build has no such kernel (e.g. a non-x86 target). Whether
// the CPU can run it is a separate question: see isa.h.
const Microkernel* microkernel_avx512();
const Microkernel* microkernel_avx2();
const Microkernel* microkernel_scalar();

// The scalar ToPixelMajorFn: also the vector kernels' edge blocks.
void to_pixel_major_scalar(int64_t C, int64_t npix, const float* src, int64_t src_cs, float* dst, int64_t dst_ps);

}  // namespace cpu
}  // namespace hsv
