// CUDA kernels of the hsv ops. The forward op picks its implementation from
// HSV_CUDA_IMPL (see cuda_impl.h): "composite" (default) is the unfused ATen
// chain (cuDNN convs) on the current stream; "fused" runs the hand-written fused
// kernel where one supports the arguments (kinds "svd" and "hsv" level 1 with
// S1 = 1, see two_stage_fused.h; "tucker2", see tucker2_fused.h) and the
// composite chain otherwise. The backward op is always the composite chain.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <exception>
#include <string>

#include "../chain/conv_chain.h"
#include "../conv2d_composite.h"
#include "../env_choice.h"
#include "cuda_impl.h"
#include "tucker2_fused.h"
#include "two_stage_fused.h"

namespace hsv {
namespace cuda {
namespace {

std::atomic<int64_t> launches{0};
std::atomic<int64_t> nhwc_launches{0};
std::atomic<int64_t> mma_launches{0};

}  // namespace

Impl impl_from_env() {
  return env_choice("HSV_CUDA_IMPL", {"composite", "fused"}) == 0 ? Impl::Composite : Impl::Fused;
}

int64_t split_k_from_env() {
  const std::string v = env_value("HSV_CUDA_SPLIT_K");
  if (v.empty() || v == "auto") return 0;
  int64_t splits = 0;
  size_t used = 0;
  try {
    splits = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  TORCH_CHECK_VALUE(used == v.size() && splits >= 1, "hsv::conv2d: HSV_CUDA_SPLIT_K='", v,
                    "' is not 'auto' or a positive integer");
  return splits;
}

int64_t fused_launch_count() { return launches.load(); }

void count_fused_launch() { launches.fetch_add(1); }

int64_t nhwc_launch_count() { return nhwc_launches.load(); }

void count_nhwc_launch() { nhwc_launches.fetch_add(1); }

int64_t mma_launch_count() { return mma_launches.load(); }

void count_mma_launch() { mma_launches.fetch_add(1); }

std::vector<std::string> fused_kinds() { return {"svd", "hsv", "tucker2"}; }

}  // namespace cuda

namespace {

at::Tensor conv2d_cuda(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       c10::string_view kind) {
  if (cuda::impl_from_env() == cuda::Impl::Composite) {
    return conv2d_composite(input, factors, bias, stride, padding, dilation, groups, kind);
  }
  const std::string k(kind);
  // make_plan validates every argument, so errors match the composite path.
  const Plan plan = make_plan(input, factors, bias, stride, padding, dilation, groups, k);
  if (cuda::two_stage_supports(input, factors, plan, k)) {
    return cuda::two_stage_forward(input, factors, bias, plan, k);
  }
  if (cuda::tucker2_supports(input, factors, plan, k)) {
    return cuda::tucker2_forward(input, factors, bias, plan);
  }
  return chain_forward(input, factors, bias, plan);
}

}  // namespace
}  // namespace hsv

TORCH_LIBRARY_IMPL(hsv, CUDA, m) {
  m.impl("conv2d", &hsv::conv2d_cuda);
  m.impl("conv2d_backward", &hsv::conv2d_backward_composite);
}
