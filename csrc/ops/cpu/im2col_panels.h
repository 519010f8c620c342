// A spatial conv in the SVD layout (kh x kw conv Cin -> r, then 1x1 r -> Cout)
// on input with few channels (an RGB stem), with pixels as the vector axis
// and the im2col panel read by pointer, never copied (see im2col_panels.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "../chain/conv_chain.h"
#include "ukernel.h"

namespace hsv {
namespace cpu {

// Whether im2col_panels_forward applies: a conv with taps (kh * kw > 1) on
// float32 input in any layout with at most 8 channels (4 when strided), and uk
// has the b_rows kernels. HSV_CPU_IM2COL_PANELS=off turns it off (to compare
// against the general kernel).
bool im2col_panels_applies(const at::Tensor& input, int64_t kh, int64_t kw, at::IntArrayRef stride,
                           const Microkernel& uk);

// out (N, Cout, Ho, Wo) in out_format (NCHW or NHWC) = U @ conv(x, V) + bias. v: the r x (Cin * kh * kw)
// values of the conv's weight (e.g. the factor (r, Cin, kh, kw)), u: Cout x r
// values, float32, row-major after reshape; cv: the conv's stride, padding and
// dilation. Both packed forms are cached against the factors (pack.h), so pass
// the layer's factors themselves, not fresh views.
at::Tensor im2col_panels_forward(const at::Tensor& input, const at::Tensor& v, const at::Tensor& u,
                                 const c10::optional<at::Tensor>& bias, int64_t kh, int64_t kw, const ConvParams& cv,
                                 at::IntArrayRef out_shape, at::MemoryFormat out_format, const Microkernel& uk);

// How many times im2col_panels_forward ran in this process (tests tell it from the general kernel).
int64_t im2col_panels_runs();

}  // namespace cpu
}  // namespace hsv
