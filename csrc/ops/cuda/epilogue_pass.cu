#include "epilogue_pass.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../env_choice.h"
#include "wmma_tiles.cuh"

namespace hsv {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Eight elements per thread (16 bytes of fp16/bf16, two float4 of fp32) where
// out and residual allow vector access, one otherwise.
template <typename S, bool Vec>
__global__ void __launch_bounds__(kThreads) tail_kernel(S* out, const S* residual, int64_t n, bool relu) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i * (Vec ? 8 : 1) < n; i += stride) {
    if constexpr (Vec) {
      tiles::tail8_global<S>(out + i * 8, residual == nullptr ? nullptr : residual + i * 8, relu);
    } else {
      const float v = tiles::to_float(out[i]) + (residual == nullptr ? 0.0f : tiles::to_float(residual[i]));
      out[i] = tiles::relu_rounded<S>(v, relu);
    }
  }
}

template <typename S>
void launch(at::Tensor& out, const at::Tensor* residual, bool relu) {
  const int64_t n = out.numel();
  S* o = static_cast<S*>(out.data_ptr());
  const S* r = residual != nullptr ? static_cast<const S*>(residual->data_ptr()) : nullptr;
  const bool vec = n % 8 == 0 && reinterpret_cast<uintptr_t>(o) % 16 == 0 &&
                   (r == nullptr || reinterpret_cast<uintptr_t>(r) % 16 == 0);
  const int64_t items = vec ? n / 8 : n;
  // A grid-stride loop over at most a few waves of CTAs.
  const int64_t sms = tiles::device_info(out.device().index()).sms;
  const int64_t ctas = std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, sms * 8));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index());
  if (vec) {
    tail_kernel<S, true><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(o, r, n, relu);
  } else {
    tail_kernel<S, false><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(o, r, n, relu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool Tail::fits_stores_of(const at::Tensor& out) const {
  if (residual == nullptr) return true;
  return residual->strides() == out.strides() && reinterpret_cast<uintptr_t>(residual->data_ptr()) % 16 == 0;
}

bool epilogue_from_env() { return env_choice("HSV_CUDA_EPILOGUE", {"off", "on"}) == 1; }

void epilogue_pass_(at::Tensor& out, const Tail& tail) {
  if (!tail.any() || out.numel() == 0) return;
  const bool one_pass = out.is_non_overlapping_and_dense() &&
                        (tail.residual == nullptr || tail.residual->strides() == out.strides()) &&
                        (out.scalar_type() == at::kFloat || out.scalar_type() == at::kHalf ||
                         out.scalar_type() == at::kBFloat16);
  if (!one_pass) {
    if (tail.residual != nullptr) out.add_(*tail.residual);
    if (tail.relu) out.relu_();
    return;
  }
  const c10::cuda::CUDAGuard guard(out.device());
  switch (out.scalar_type()) {
    case at::kHalf: return launch<__half>(out, tail.residual, tail.relu);
    case at::kBFloat16: return launch<__nv_bfloat16>(out, tail.residual, tail.relu);
    default: return launch<float>(out, tail.residual, tail.relu);
  }
}

}  // namespace cuda
}  // namespace hsv
