// The channels_last fast path of the fused two-stage forward (kinds svd and
// hsv level 1, see two_stage_fused.h): y = bias + U @ conv(x, V) for fp16/bf16
// NHWC tensors whose channel counts let every load and store be 16 bytes wide.
// The general kernel in two_stage_fused.cu covers every other case.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../chain/conv_chain.h"
#include "epilogue_pass.h"

namespace hsv {
namespace cuda {

// Whether the NHWC kernel takes these arguments: fp16/bf16, input channels
// unit-stride with pixel strides multiples of 8 elements (16 bytes) and a
// 16-byte aligned base, Cin % 32 == 0 (a K step never straddles two taps),
// Cout % 8 == 0, rank <= 128.
bool nhwc_supports(const at::Tensor& input, int64_t cin, int64_t rank, int64_t cout);

// The padded rank the NHWC kernel runs with: 16, 32, 64 or 128 (its
// accumulators are sized at compile time).
int64_t nhwc_padded_rank(int64_t rank);

// out = bias + Up @ conv(x, Vp) as a new channels_last tensor. vp (rp,
// kh*kw*cin): rows with K ordered (tap, channel); up (cout_pad, rp), cout_pad a
// multiple of 64; both zero-padded, contiguous and 16-byte aligned, with
// rp = nhwc_padded_rank(rank). bias_f: fp32 (Cout) or undefined. Splits K over
// CTAs where the pixel tiles alone leave SMs idle (HSV_CUDA_SPLIT_K forces it).
// With a tail, relu?(out + residual): in the stores without split-K, after the
// sum of the parts with it.
at::Tensor nhwc_forward(const at::Tensor& input, const at::Tensor& vp, const at::Tensor& up,
                        const at::Tensor& bias_f, const Plan& plan, int64_t kh, int64_t kw, int64_t cout,
                        const Tail& tail = Tail());

}  // namespace cuda
}  // namespace hsv
