// A 1x1 factorized conv (kind "svd", or "hsv" in its SVD layout) on NCHW
// input, as two GEMMs with pixels as the vector axis (see pointwise_nchw.cpp).
#pragma once

#include <ATen/ATen.h>

#include "ukernel.h"

namespace hsv {
namespace cpu {

// Whether pointwise_nchw_forward applies: a 1x1, stride-1, unpadded conv given as
// V (r, Cin) and U (Cout, r) on float32 input whose pixels are contiguous within
// each channel plane but whose channels are not (NCHW, or a channel slice of it).
bool pointwise_nchw_applies(const at::Tensor& input, int64_t kh, int64_t kw, at::IntArrayRef stride,
                            at::IntArrayRef padding);

// out (N, Cout, H, W), NCHW = U @ V @ x per pixel, + bias. v: (r, Cin) row-major,
// u: (Cout, r) row-major, both float32 and contiguous.
at::Tensor pointwise_nchw_forward(const at::Tensor& input, const at::Tensor& v, const at::Tensor& u,
                                  const c10::optional<at::Tensor>& bias, const Microkernel& uk);

// How many times pointwise_nchw_forward ran in this process (tests tell it from a fallback).
int64_t pointwise_nchw_runs();

}  // namespace cpu
}  // namespace hsv
