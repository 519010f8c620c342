// The tail of hsv::conv2d_epilogue: out = relu(conv + residual), the residual
// add and the ReLU that follow most convs of a ResNet, done on the conv's output
// in one pass instead of two more ops (each a full read and write of it).
#pragma once

#include <ATen/ATen.h>

namespace hsv {

// Checks residual against the conv output it is added to: same shape, dtype
// and device as out. Throws c10::ValueError naming "residual".
void check_residual(const at::Tensor& residual, const at::Tensor& out);

// out += residual (when defined), then out = max(out, 0) when relu, in place.
// NaN stays NaN, as in torch.relu.
void apply_epilogue_(at::Tensor& out, const c10::optional<at::Tensor>& residual, bool relu);

}  // namespace hsv
