// A 1x1 factorized conv (kind "svd", or "hsv" in its SVD layout) on NCHW
// input, as two GEMMs with pixels as the vector axis (see pointwise_nchw.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "ukernel.h"

namespace hsv {
namespace cpu {

// Whether pointwise_nchw_forward applies: a 1x1 unpadded conv (any stride)
// given as V (r, Cin) and U (Cout, r) on float32 input whose channels are not
// the unit-stride axis (NCHW, or a view of it), and, unless
// HSV_CPU_POINTWISE_NCHW=on, whose V fits in 3/4 of the L2 cache.
// HSV_CPU_POINTWISE_NCHW=off never applies.
bool pointwise_nchw_applies(const at::Tensor& input, int64_t kh, int64_t kw, at::IntArrayRef stride,
                            at::IntArrayRef padding, int64_t rank);

// out (N, Cout, H, W), NCHW = U @ V @ x per pixel, + bias. v: r x Cin values
// (e.g. the factor (r, Cin, 1, 1)), u: Cout x r values, float32, row-major
// after reshape. v's packed form is cached against v (pack.h), so pass the
// layer's factor itself, not a fresh view of it.
at::Tensor pointwise_nchw_forward(const at::Tensor& input, const at::Tensor& v, const at::Tensor& u,
                                  const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  const Microkernel& uk);

// How many times pointwise_nchw_forward ran in this process (tests tell it from a fallback).
int64_t pointwise_nchw_runs();

}  // namespace cpu
}  // namespace hsv
