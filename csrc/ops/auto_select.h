// HSV_CPU_IMPL=auto and HSV_CUDA_IMPL=auto: choose between the fused kernel and
// the composite chain by timing both, once per layer configuration (as
// cudnn.benchmark does for cuDNN algorithms). Rules written from benchmarks did
// not carry over between layers: on the CPU the same "channels_last and few
// pixels" rule picked fused where it was 0.5x of composite and where it was
// 3.3x; on an H100 the fused kernel took 0.5x of composite's time on one layer
// and 1.7x on another of the same family.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <string>

#include "chain/conv_chain.h"

namespace hsv {

// Everything that changes which path is faster: device, kind, input sizes and
// layout, factor shapes, conv parameters, bias, dtype, plus `where` (CPU: the
// thread count and ISA).
std::string auto_key(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                     const Plan& plan, const std::string& kind, const std::string& where);

// Seconds one run of fn took (the timer's own notion: wall time on the CPU,
// device time between two events on a CUDA stream), its output in *out.
using AutoTimer = std::function<double(const std::function<at::Tensor()>& fn, at::Tensor* out)>;

// The choice made for key so far: 1 fused, 0 composite, -1 none yet.
int auto_cached(const std::string& key);

// Times both paths (two warm-ups each, then five alternating timed runs, best
// of each), remembers the faster for key and returns its output of the last run.
at::Tensor auto_time(const std::string& key, const std::function<at::Tensor()>& fused,
                     const std::function<at::Tensor()>& composite, const AutoTimer& timer);

// key -> "fused" | "composite" for every configuration decided so far, CPU and CUDA.
std::map<std::string, std::string> auto_choices();
int64_t clear_auto_choices();

}  // namespace hsv
