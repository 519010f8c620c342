// HSV_CPU_IMPL=auto: choose between the fused kernel and the composite chain by
// timing both, once per layer configuration (as cudnn.benchmark does for cuDNN
// algorithms). Rules written from benchmarks did not carry over between layers:
// the same "channels_last and few pixels" rule picked fused where it was 0.5x
// of composite and where it was 3.3x.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <string>

#include "../chain/conv_chain.h"

namespace hsv {
namespace cpu {

// Everything that changes which path is faster: kind, input sizes and layout,
// factor shapes, conv parameters, bias, dtype, thread count and ISA.
std::string auto_key(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                     const Plan& plan, const std::string& kind, const std::string& isa);

// The result of the faster path for `key`. On the first call for a key, times
// both (two warm-ups each, then five alternating timed runs, best of each) and
// remembers the faster one; returns that path's output of the last run.
at::Tensor auto_run(const std::string& key, const std::function<at::Tensor()>& fused,
                    const std::function<at::Tensor()>& composite);

// key -> "fused" | "composite" for every configuration decided so far.
std::map<std::string, std::string> auto_choices();
int64_t clear_auto_choices();

}  // namespace cpu
}  // namespace hsv
