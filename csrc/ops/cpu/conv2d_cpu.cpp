// CPU kernels of the hsv ops. The forward op picks its implementation from
// HSV_CPU_IMPL (see isa.h): "composite" (default) is the unfused ATen chain
// (oneDNN convs); "fused" runs the hand-written fused kernel where one exists
// (kinds "svd" and "hsv", float32) and the composite chain otherwise; "auto"
// does the same as "fused" for now (the cost model that may prefer the chain
// comes later).
// The backward op is always the composite chain.
#include <torch/library.h>

#include "../chain/conv_chain.h"
#include "../conv2d_composite.h"
#include "hsv_fused.h"
#include "isa.h"
#include "svd_fused.h"

namespace hsv {
namespace {

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
  if (cpu::svd_fused_supports(input, k)) {
    return cpu::svd_fused_forward(input, factors, bias, plan, cpu::select_microkernel());
  }
  if (cpu::hsv_fused_supports(input, k) && groups == 1) {
    return cpu::hsv_fused_forward(input, factors, bias, plan, cpu::select_microkernel());
  }
  return chain_forward(input, factors, bias, plan);
}

}  // namespace
}  // namespace hsv

TORCH_LIBRARY_IMPL(hsv, CPU, m) {
  m.impl("conv2d", &hsv::conv2d_cpu);
  m.impl("conv2d_backward", &hsv::conv2d_backward_composite);
}
