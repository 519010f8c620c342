// CPU kernels of the hsv ops. The forward op picks its implementation from
// HSV_CPU_IMPL (see isa.h): "fused" (default) runs the hand-written fused kernel where one exists
// (kinds "svd" and "hsv", float32: hsv_fused.cpp; "tucker2" as a 1x1 pass plus
// that kernel: tucker2_two_pass.cpp; "ht2" and "tt_tucker" as two oneDNN convs
// plus that kernel: separable_two_pass.cpp; "kcp": kcp_fused.cpp) and the composite
// chain otherwise; "composite" is the unfused ATen chain (oneDNN convs), the
// baseline; "auto" times both on the first call of each layer configuration and
// keeps the faster (../auto_select.h). Fused is the default: end to end it measured
// faster than composite in all but one model run (that one a 2% tie), though not
// on every layer (bench/results/cpu-fused-notes.md).
// The backward op is always the composite chain. conv2d_epilogue runs the same
// forward with its residual add and ReLU (../epilogue.h) on each output tile of
// the general fused kernel, and after the conv on the other paths.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <chrono>
#include <string>

#include "../auto_select.h"
#include "../chain/conv_chain.h"
#include "../conv2d_composite.h"
#include "../epilogue.h"
#include "hsv_fused.h"
#include "isa.h"
#include "kcp_fused.h"
#include "separable_two_pass.h"
#include "tucker2_two_pass.h"

namespace hsv {
namespace {

// The forward of both ops: conv2d, and conv2d_epilogue's conv with its tail
// (epilogue.residual/relu), which the general fused kernel applies per output
// tile and every other path after the conv (apply_epilogue_).
at::Tensor forward_cpu(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       c10::string_view kind, const cpu::Epilogue& epilogue) {
  const c10::optional<at::Tensor> residual =
      epilogue.residual ? c10::optional<at::Tensor>(*epilogue.residual) : c10::nullopt;
  auto after = [&](at::Tensor out) {
    if (residual) check_residual(*residual, out.sizes(), input);  // add_ would broadcast what it should refuse
    apply_epilogue_(out, residual, epilogue.relu);
    return out;
  };
  const cpu::Impl impl = cpu::impl_from_env();
  if (impl == cpu::Impl::Composite) {
    return after(conv2d_composite(input, factors, bias, stride, padding, dilation, groups, kind));
  }
  const std::string k(kind);
  // make_plan validates every argument, so errors match the composite path.
  const Plan plan = make_plan(input, factors, bias, stride, padding, dilation, groups, k);
  if (epilogue.residual) check_residual(*epilogue.residual, plan.out_shape, input);
  const bool tucker2 = cpu::tucker2_two_pass_supports(input, k);
  const bool kcp = cpu::kcp_fused_supports(input, k);
  const bool separable = cpu::separable_two_pass_supports(input, k);
  if ((!tucker2 && !kcp && !separable && !cpu::hsv_fused_supports(input, k)) || groups != 1) {
    return after(chain_forward(input, factors, bias, plan));
  }
  const cpu::Microkernel& uk = cpu::select_microkernel();
  auto fused = [&] {
    if (tucker2) return after(cpu::tucker2_two_pass_forward(input, factors, bias, plan, uk));
    if (kcp) return after(cpu::kcp_fused_forward(input, factors, bias, plan, uk));
    if (separable) return after(cpu::separable_two_pass_forward(input, factors, bias, plan, uk));
    return cpu::hsv_fused_forward(input, factors, bias, plan, uk, k, epilogue);
  };
  if (impl == cpu::Impl::Fused || input.numel() == 0) {
    return fused();
  }
  auto composite = [&] { return after(chain_forward(input, factors, bias, plan)); };
  const bool tail = epilogue.residual != nullptr || epilogue.relu;
  const std::string key = auto_key(input, factors, bias, plan, k,
                                   "t" + std::to_string(at::get_num_threads()) + ' ' + uk.isa + (tail ? " tail" : ""));
  const int cached = auto_cached(key);
  if (cached >= 0) return cached ? fused() : composite();
  return auto_time(key, fused, composite, [](const std::function<at::Tensor()>& fn, at::Tensor* out) {
    const auto start = std::chrono::steady_clock::now();
    *out = fn();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  });
}

at::Tensor conv2d_cpu(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      c10::string_view kind) {
  return forward_cpu(input, factors, bias, stride, padding, dilation, groups, kind, {});
}

at::Tensor conv2d_epilogue_cpu(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               c10::string_view kind, bool relu) {
  cpu::Epilogue epilogue;
  epilogue.residual = residual.has_value() && residual->defined() ? &*residual : nullptr;
  epilogue.relu = relu;
  return forward_cpu(input, factors, bias, stride, padding, dilation, groups, kind, epilogue);
}

}  // namespace
}  // namespace hsv

TORCH_LIBRARY_IMPL(hsv, CPU, m) {
  m.impl("conv2d", &hsv::conv2d_cpu);
  m.impl("conv2d_backward", &hsv::conv2d_backward_composite);
  m.impl("conv2d_epilogue", &hsv::conv2d_epilogue_cpu);
}
