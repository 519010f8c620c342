// CPU kernels of the hsv ops. The forward op picks its implementation from
// HSV_CPU_IMPL (see isa.h): "composite" (default) is the unfused ATen chain
// (oneDNN convs); "fused" runs the hand-written fused kernel where one exists
// (kinds "svd" and "hsv", float32: hsv_fused.cpp) and the composite chain
// otherwise; "auto" runs the fused kernel only where prefer_fused says it
// measured faster.
// The backward op is always the composite chain.
#include <torch/library.h>

#include "../chain/conv_chain.h"
#include "../conv2d_composite.h"
#include "hsv_fused.h"
#include "isa.h"

namespace hsv {
namespace {

// HSV_CPU_IMPL=auto: whether the fused kernel beat the composite chain on
// similar layers (single thread, ResNet 3x3/1x1 layers at batch 1 and 8, see
// bench/results/cpu-fused-hsv-*.md). Both fused kernels read NCHW inputs with
// strided loads and lose to oneDNN there (x1.1-1.4 at batch 8), so NCHW stays
// composite. On channels_last inputs fused hsv was 0.45-0.7 of composite up to
// a few thousand output pixels, about even beyond (0.94-1.07) and clearly
// worse at 64 channels x 56x56 x batch 8 (x1.6); with S1 > 1 input groups the
// composite chain runs a small-channel conv on a batch-folded view and fused
// won (0.55-0.92 at batch 8). Kind "svd" runs the same kernel as hsv with S1 = 1.
bool prefer_fused(const at::Tensor& input, at::TensorList factors, const Plan& plan, const std::string& kind) {
  if (input.stride(1) != 1 || input.size(1) == 1) return false;  // NCHW (or ambiguous single-channel) input
  const int64_t pixels = plan.out_shape[0] * plan.out_shape[2] * plan.out_shape[3];
  const int64_t s1 = kind == "hsv" ? factors[factors[0].dim() == 4 ? 2 : 1].size(1) : 1;
  return s1 > 1 || pixels <= 4096;
}

at::Tensor conv2d_cpu(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      c10::string_view kind) {
  const cpu::Impl impl = cpu::impl_from_env();
  if (impl == cpu::Impl::Composite) {
    return conv2d_composite(input, factors, bias, stride, padding, dilation, groups, kind);
  }
  const std::string k(kind);
  // make_plan validates every argument, so errors match the composite path.
  const Plan plan = make_plan(input, factors, bias, stride, padding, dilation, groups, k);
  if (impl == cpu::Impl::Auto && !prefer_fused(input, factors, plan, k)) {
    return conv2d_composite(input, factors, bias, stride, padding, dilation, groups, kind);
  }
  if (cpu::hsv_fused_supports(input, k) && groups == 1) {
    return cpu::hsv_fused_forward(input, factors, bias, plan, cpu::select_microkernel(), k);
  }
  return chain_forward(input, factors, bias, plan);
}

}  // namespace
}  // namespace hsv

TORCH_LIBRARY_IMPL(hsv, CPU, m) {
  m.impl("conv2d", &hsv::conv2d_cpu);
  m.impl("conv2d_backward", &hsv::conv2d_backward_composite);
}
