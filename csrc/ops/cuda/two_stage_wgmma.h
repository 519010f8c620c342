// The warpgroup-MMA (wgmma, sm_90a) variant of the fused two-stage forward
// (kinds svd and hsv level 1, see two_stage_fused.h): y = bias + U @ conv(x, V)
// for fp16/bf16 channels_last tensors, on the same shapes and packed factors as
// the mma.sync kernel (two_stage_mma.h). Both GEMMs run as asynchronous
// warpgroup MMAs: stage 1 with both operands in swizzled shared memory, stage 2
// with the rank-r intermediate taken from the stage-1 accumulators in registers.
//
// Written and compiled without a GPU (2026-11-23) and not yet run: it is off the
// default path and runs only where HSV_CUDA_NHWC=wgmma asks for it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../chain/conv_chain.h"
#include "epilogue_pass.h"

namespace hsv {
namespace cuda {

// Whether this extension holds the kernel's sm_90a code (built with 9.0a in
// TORCH_CUDA_ARCH_LIST, which setup.py makes of 9.0 unless HSV_NO_SM90A=1).
bool wgmma_built();

// For arguments that nhwc_supports() takes: whether HSV_CUDA_NHWC=wgmma asks
// for this kernel. Throws c10::ValueError when it does but the extension has no
// sm_90a code or the device is not compute capability 9.x.
bool wgmma_selected(const at::Tensor& input);

// out = bias + Up @ conv(x, Vp) as a new channels_last tensor; operands as for
// mma_forward (vp (rp, kh*kw*cin) with K ordered (tap, channel), up (cout_pad,
// rp), rp in {16, 32, 64, 128}, cout_pad a multiple of 64). Pixel tiles of 64
// per warpgroup, one or two warpgroups per CTA (HSV_CUDA_WGMMA_WG = auto | 1 | 2);
// K steps of 64 channels where Cin % 64 == 0, else 32 (HSV_CUDA_MMA_KSTEP);
// split-K over a cluster of CTAs as in the mma kernel (HSV_CUDA_SPLIT_K). A
// tail as in mma_forward.
at::Tensor wgmma_forward(const at::Tensor& input, const at::Tensor& vp, const at::Tensor& up,
                         const at::Tensor& bias_f, const Plan& plan, int64_t kh, int64_t kw, int64_t cout,
                         const Tail& tail = Tail());

// The last launch's (warpgroups per CTA, cluster CTAs, pixel tiles, K step).
std::vector<int64_t> wgmma_last_config();

}  // namespace cuda
}  // namespace hsv
