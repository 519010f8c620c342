// Fused CUDA forward of kind "kcp" (chain/kind_kcp.cpp), 6 factors or the
// merged 5: every stage of the chain in one kernel, a CTA per tile of output
// pixels, the intermediates in shared memory (../kcp_cta_program.h, which the
// CPU build also runs, through ../kcp_cta_emulate.h, to test it without a GPU).
// fp16/bf16 on tensor cores (WMMA, fp32 accumulation), the depthwise taps on
// the CUDA cores in fp32. Off unless HSV_CUDA_KCP=on until it has run on a GPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "../chain/conv_chain.h"
#include "../kcp_cta_params.h"

namespace hsv {
namespace cuda {

// Whether kcp_forward runs these arguments on this device, and if so its launch
// geometry (tile, splits, shared-memory layout) in *geometry; if not and reason is
// given, it says why (dtype, S2 or T2 not a multiple of 16, shared memory, ...).
bool kcp_supports(const at::Tensor& input, at::TensorList factors, const Plan& plan, const std::string& kind,
                  KcpParams* geometry, std::string* reason = nullptr);

// plan from make_plan, geometry from kcp_supports for the same arguments (the
// cost model runs once per call). cache: keep the packed factors against the
// factors (false while a CUDA graph is captured).
at::Tensor kcp_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                       const Plan& plan, KcpParams geometry, bool cache);

// The last launch's (tile_h, tile_w, nb, splits, shared-memory bytes), for benchmarks.
std::vector<int64_t> kcp_last_config();

}  // namespace cuda
}  // namespace hsv
