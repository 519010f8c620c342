// The Hopper fast path of the fused two-stage forward (kinds svd and hsv level
// 1, see two_stage_fused.h): y = bias + U @ conv(x, V) for fp16/bf16
// channels_last tensors, on mma.sync tensor-core instructions fed by ldmatrix,
// with the rank-r intermediate kept in registers between the two GEMMs, and
// split-K done inside a thread-block cluster (the partial intermediates summed
// through distributed shared memory, no atomics, no fp32 output buffer).
// Needs compute capability 9.0 (clusters); it takes the same shapes as the
// WMMA channels_last kernel (two_stage_nhwc.h), which stays for 8.x.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../chain/conv_chain.h"
#include "epilogue_pass.h"

namespace hsv {
namespace cuda {

// For arguments that nhwc_supports() takes: whether the mma kernel runs them
// rather than the WMMA one, i.e. the device has compute capability 9.0 or newer
// and HSV_CUDA_NHWC = auto (default) | mma, not wmma (the older kernel, for
// comparisons); wgmma (two_stage_wgmma.h) is checked before this; other values
// throw c10::ValueError naming the variable.
bool mma_selected(const at::Tensor& input);

// out = bias + Up @ conv(x, Vp) as a new channels_last tensor; operands as for
// nhwc_forward (vp (rp, kh*kw*cin), K ordered (tap, channel); up (cout_pad,
// rp), cout_pad a multiple of 64; rp = nhwc_padded_rank(rank)). Pixel tiles
// of 64 or 128 by a small model of the grid (HSV_CUDA_MMA_MI = 1 or 2 pixel
// fragments of 16 per warp forces it); K steps of 64 channels where Cin % 64
// == 0, else 32 (HSV_CUDA_MMA_KSTEP forces 32); split-K over a cluster of up
// to 4 CTAs where the pixel tiles leave SMs idle (HSV_CUDA_SPLIT_K forces it,
// up to 8). Input blocks (a tile is a block of one image whose input is loaded
// once per channel chunk for all taps) at stride 1 where there are at least as
// many blocks as SMs; HSV_CUDA_MMA_HALO = 0 | 1 forces them off | on wherever
// they apply (>= 4 taps, the block fits shared memory). With a tail, relu?(out +
// residual), applied as each chunk is stored (after the kernel where the
// residual does not lie like out, see Tail::fits_stores_of).
at::Tensor mma_forward(const at::Tensor& input, const at::Tensor& vp, const at::Tensor& up, const at::Tensor& bias_f,
                       const Plan& plan, int64_t kh, int64_t kw, int64_t cout,
                       const Tail& tail = Tail());

// The last launch's (pixel fragments per warp, cluster CTAs, pixel tiles, K step,
// input blocks 0/1, block rows, block columns; the last two 0 without blocks):
// tests check that a forced setting took effect, benchmarks report the choice.
std::vector<int64_t> mma_last_config();

}  // namespace cuda
}  // namespace hsv
