// The unfused chain: each stage of a factorized conv as one ATen conv call.
// Device-agnostic; registered for CPU and CUDA, and the baseline the fused
// kernels are measured against.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>
#include <vector>

namespace hsv {

at::Tensor conv2d_composite(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups, c10::string_view kind);

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> conv2d_backward_composite(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList factors, bool has_bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, c10::string_view kind,
    std::array<bool, 3> output_mask);

}  // namespace hsv
