// The tail of hsv::conv2d_epilogue: out = relu(conv + residual), the residual
// add and the ReLU that follow most convs of a ResNet, done on the conv's output
// in one pass instead of two more ops (each a full read and write of it).
#pragma once

#include <ATen/core/Tensor.h>

namespace hsv {

// Checks residual against the conv output it is added to: that shape, and
// input's dtype and device. Throws c10::ValueError naming "residual".
void check_residual(const at::Tensor& residual, at::IntArrayRef out_shape, const at::Tensor& input);

// out += residual (when defined), then out = max(out, 0) when relu, in place.
// NaN stays NaN, as in torch.relu.
void apply_epilogue_(at::Tensor& out, const c10::optional<at::Tensor>& residual, bool relu);

// The same on n floats: o[i] = relu?(o[i] + r[i]); r may be null (no residual).
void epilogue_span(float* o, const float* r, int64_t n, bool relu);

// conv2d_epilogue as hsv::conv2d through the dispatcher (the backend's conv kernel), then
// apply_epilogue_: every backend's kernel unless it registers its own.
at::Tensor conv2d_epilogue_default(const at::Tensor& input, at::TensorList factors,
                                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, c10::string_view kind, bool relu);

}  // namespace hsv
