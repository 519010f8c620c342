// The two-stage fused kernels' operands (Vp, Up, the fp32 bias) written by one
// CUDA kernel straight from the factors, instead of 4 to 6 ATen kernels
// (zero-fill, permute-copy, kron for hsv). Packing runs on every call while a
// CUDA graph is captured (the cache is bypassed so that a replay sees in-place
// updates of the factors), and there it cost 12 to 23 us per call on an H100
// (bench/results/gpu-h100-2026-11-22-session3.md). HSV_CUDA_PACK = kernel
// (default since its tests and the sanitizers passed on an H100, 2026-11-22)
// | aten (the ATen ops, kept as the cross-check).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace hsv {
namespace cuda {

// Which packing HSV_CUDA_PACK selects: true for "kernel" or unset, false for
// "aten"; throws c10::ValueError naming the variable on other values.
bool pack_with_kernel();

// The factors as the packing kernel reads them: V = B (P, T2, Cin, kh, kw)
// with row r = p * T2 + t2, and U = A (T1, P) kron I_T2 (svd: B = V viewed
// with T2 = 1, A = U). Any of vp, up, bias_f may be undefined: that part is
// not written. vp (rp, k_pad), up (cout_pad, rp): contiguous, the factors'
// dtype, every element written (zero padding included), so they can come from
// at::empty. bias_f: fp32 (Cout). One launch on the current stream.
void pack_two_stage(const at::Tensor& b5, const at::Tensor& a2, const at::Tensor& bias, const at::Tensor& vp,
                    const at::Tensor& up, const at::Tensor& bias_f);

}  // namespace cuda
}  // namespace hsv
