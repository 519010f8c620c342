// Host side of the fused kcp kernel (kcp_cta_program.h), shared by the CUDA
// launch (cuda/kcp_cuda.cu) and the CPU emulator (kcp_cta_emulate.h): the tile
// choice, the shared-memory layout and the packed factors. Plain ATen.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "chain/conv_chain.h"
#include "kcp_cta_params.h"

namespace hsv {

// A tile forced by a test: tile_h x tile_w output pixels, nb (q, n) pairs per
// block, the blocks split over `splits` CTAs (0 or 1: not split).
struct KcpTile {
  int tile_h = 0, tile_w = 0, nb = 0, splits = 0;
};

// Fills p's geometry, tile and shared-memory layout for factors that make_plan
// accepted for kind "kcp" (plan from make_plan). The tile is `force` when given,
// else the one a small cost model (tensor-core MACs, depthwise MACs at a SIMT
// weight, waves over `sms` multiprocessors, the cost of splitting the qn blocks
// over several CTAs) rates cheapest among those that fit in smem_limit bytes.
// Returns false, with *reason, where the kernel cannot run these arguments: an
// fp16/bf16 operand dtype, S2 a multiple of 16 and (6 factors) T2 a multiple of
// 16 are required.
bool kcp_cta_geometry(const at::Tensor& input, at::TensorList factors, const Plan& plan, int64_t smem_limit,
                      int64_t sms, KcpParams& p, std::string* reason, const KcpTile* force = nullptr);

// The factors packed (zero-padded, operand dtype; ah and aw and the bias in fp32)
// and their pointers set in p. With `cache`, each is kept against its factor
// (cpu::packed_cached); without it (while a CUDA graph is captured) made per call.
// The returned tensors must outlive the launch.
std::vector<at::Tensor> kcp_cta_pack(at::TensorList factors, const c10::optional<at::Tensor>& bias, KcpParams& p,
                                     bool cache);

// The fp32 workspace of the splits' partial sums (undefined when not split); sets p.ws.
at::Tensor kcp_cta_workspace(const at::Tensor& input, KcpParams& p);

// Input and output pointers and strides; out is (B, Cout, Ho, Wo) in the op's memory format.
void kcp_cta_bind(const at::Tensor& input, const at::Tensor& out, KcpParams& p);

// CTAs of the launch: splits x batch x tiles_y x tiles_x.
inline long long kcp_cta_count(const KcpParams& p) {
  return static_cast<long long>(p.splits) * p.batch * p.tiles_y * p.tiles_x;
}

}  // namespace hsv
