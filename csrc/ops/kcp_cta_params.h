// What one launch of the fused kcp CUDA kernel needs (kcp_cta_program.h): the
// geometry, the tile, the shared-memory layout and the packed factors. Plain
// C++ with no CUDA headers: built on every machine, because the CPU build runs
// the same CTA program through an emulator (kcp_cta_emulate.h) in the tests.
#pragma once

namespace hsv {

// At most this many distinct input rows (columns) under one output tile:
// tile_h * kh (tile_w * kw) taps, fewer where they coincide.
constexpr int kKcpMaxSlots = 64;
constexpr int kKcpThreads = 256;  // 8 warps
constexpr int kKcpWarps = kKcpThreads / 32;
constexpr int kKcpStageBytes = kKcpWarps * 256 * 4;  // a 16 x 16 fp32 tile per warp

struct KcpParams {
  const void* x;                   // input (B, S1*S2, H, W), read through its strides (elements)
  long long sn, sc, sh, sw;
  void* out;                       // output (B, Cout, Ho, Wo), written through its strides
  long long on, oc, oh, ow;
  int batch, h, w, ho, wo;
  int kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int in_channels_fastest, out_channels_fastest;  // channels_last: copy loops run along the channels
  // kcp sizes (chain/kind_kcp.cpp) and their padding to what the 16 x 16 x 16 tiles need
  int Q, N, S1, S2, R, T1, T2, cout, merged;
  int qn, qnp, s1p, rp, t1p, coutp;
  int nb;                          // (q, n) pairs per block, a multiple of 16
  // The qn blocks of a tile are split over `splits` CTAs, split_blocks blocks each (the last may have
  // fewer); with splits > 1 they write partial sums to ws (fp32, [split][b][cout][ho][wo], ws_split
  // floats per split) and kcp_cta_finalize makes the output.
  int splits, split_blocks;
  float* ws;
  long long ws_split;
  // A CTA computes tile_h x tile_w output pixels (p of them, a multiple of 16) of one image.
  int tile_h, tile_w, tiles_y, tiles_x, p;
  // The input rows (columns) its taps read, relative to the tile's first: halo
  // row k is row_off[k]; tap i of tile row oy reads halo row row_slot[oy * kh + i].
  int nrows, ncols, hp, hpp;       // hp = nrows * ncols halo pixels, hpp rounded up to 16
  int hc;                          // halo pixels per chunk of the first two stages, a multiple of 16
  int row_off[kKcpMaxSlots], col_off[kKcpMaxSlots];
  int row_slot[kKcpMaxSlots], col_slot[kKcpMaxSlots];
  // Packed factors (kcp_cta_plan.h): operand dtype, zero-padded; ah, aw fp32.
  const void* bs;                  // (qnp, s1p)
  const void* as;                  // (N, rp, S2)
  const float* ah;                 // (N, R, kh)
  const float* aw;                 // (N, R, kw)
  const void* at;                  // (N, T2, rp)        6 factors
  const void* bt;                  // (t1p, qnp)         6 factors
  const void* m;                   // (coutp, qnp, rp)   merged
  const float* bias;               // cout floats or nullptr
  // Shared memory (byte offsets): a and b, two regions the intermediates
  // alternate between (a holds a chunk's input and z0, then z3), y the fp32
  // output tile, stage a 16 x 16 fp32 tile per warp (the tensor-core epilogue).
  int off_a, off_b, off_y, off_stage, smem_bytes;
  int y_rows;                      // t1p * T2 (6 factors) or coutp (merged)
};

}  // namespace hsv
