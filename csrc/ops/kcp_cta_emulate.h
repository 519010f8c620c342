// The fused kcp CUDA kernel's CTA program (kcp_cta_program.h) run on the CPU,
// for tests on machines without a GPU: each CTA with its own shared-memory
// buffer, each phase's items one after another (forwards, or backwards with
// `reverse`, so an item that reads what another item of its phase writes gives
// a different answer), the 16 x 16 tensor-core tiles as plain loops with fp32
// accumulation. It checks what the hardware would not forgive: every tile
// operand's alignment (32 bytes) and leading dimension, every tile read and
// write within shared memory or a packed factor, no write past the shared
// memory the launch asks for, and no read of shared memory nothing wrote
// (the buffer starts as NaN, so such a read shows up in the output).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace hsv {

// Same arguments as hsv::conv2d(kind="kcp"), fp16/bf16 CPU tensors. tile_h,
// tile_w, nb, splits: a forced tile (all 0: the cost model's choice for an H100's
// 227 KiB of shared memory and 132 multiprocessors). With splits > 1 the second
// launch (kcp_cta_finalize) runs too. Throws c10::ValueError with the reason
// where the kernel would not run these arguments.
at::Tensor kcp_cta_emulate(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t tile_h,
                           int64_t tile_w, int64_t nb, int64_t splits, bool reverse);

// The tile the cost model picks for these arguments: (tile_h, tile_w, nb, splits, shared-memory bytes).
std::vector<int64_t> kcp_cta_tile(const at::Tensor& input, at::TensorList factors, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t smem_limit, int64_t sms);

}  // namespace hsv
