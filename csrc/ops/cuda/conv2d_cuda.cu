// CUDA kernels of the hsv ops. The forward op picks its implementation from
// HSV_CUDA_IMPL (see cuda_impl.h): "fused" runs the hand-written fused kernel
// where one supports the arguments (kinds "svd" and "hsv" level 1 with S1 = 1,
// see two_stage_fused.h; "tucker2", see tucker2_fused.h) and the composite
// chain otherwise; "composite" is the unfused ATen chain (cuDNN convs) on the
// current stream; "auto" (the default), with torch.backends.cudnn.benchmark on,
// times fused against composite on the first call of each layer configuration
// and keeps the faster (../auto_select.h); without it, fused only where it
// measured faster (two_stage_fused_by_default), else composite.
// HSV_CUDA_FOLD=on (off by default until its tests have run on a GPU) also runs
// tucker2, ht2, tt_tucker, cp and level-2 hsv through the two-stage kernel, on
// factors folded into its form (../fold_two_stage.h). HSV_CUDA_KCP=on (off
// until tested on a GPU) runs kind "kcp" through its own fused kernel (kcp_cuda.h).
// The backward op is always the composite chain. conv2d_epilogue: with
// HSV_CUDA_EPILOGUE=on (off until its tests have run on a GPU), the same
// forward with the residual add and ReLU in the channels_last kernels' stores
// and one pass after every other path (epilogue_pass.h); off, the conv then
// ATen's add_ and relu_ (../epilogue.h).
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <atomic>
#include <exception>
#include <functional>
#include <optional>
#include <string>

#include "../auto_select.h"
#include "../chain/conv_chain.h"
#include "../conv2d_composite.h"
#include "../env_choice.h"
#include "../epilogue.h"
#include "../fold_two_stage.h"
#include "cuda_impl.h"
#include "epilogue_pass.h"
#include "kcp_cuda.h"
#include "tucker2_fused.h"
#include "two_stage_fused.h"

namespace hsv {
namespace cuda {
namespace {

std::atomic<int64_t> launches{0};
std::atomic<int64_t> nhwc_launches{0};
std::atomic<int64_t> mma_launches{0};
std::atomic<int64_t> wgmma_launches{0};
std::atomic<int64_t> fold_launches{0};
std::atomic<int64_t> kcp_launches{0};

}  // namespace

Impl impl_from_env() {
  switch (env_choice("HSV_CUDA_IMPL", {"auto", "composite", "fused"})) {
    case 1: return Impl::Composite;
    case 2: return Impl::Fused;
    default: return Impl::Auto;
  }
}

NhwcKernel nhwc_kernel_from_env() {
  switch (env_choice("HSV_CUDA_NHWC", {"auto", "mma", "wmma", "wgmma"})) {
    case 1: return NhwcKernel::Mma;
    case 2: return NhwcKernel::Wmma;
    case 3: return NhwcKernel::Wgmma;
    default: return NhwcKernel::Auto;
  }
}

bool fold_from_env() { return env_choice("HSV_CUDA_FOLD", {"off", "on"}) == 1; }

bool kcp_from_env() { return env_choice("HSV_CUDA_KCP", {"off", "on"}) == 1; }

int mma_k_step(int64_t cin) {
  constexpr int kKSteps[] = {0, 32, 64};
  const int ks = kKSteps[env_choice("HSV_CUDA_MMA_KSTEP", {"auto", "32", "64"})];
  if (ks != 0 && cin % ks == 0) return ks;
  return cin % 64 == 0 ? 64 : 32;
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

int64_t wgmma_launch_count() { return wgmma_launches.load(); }

void count_wgmma_launch() { wgmma_launches.fetch_add(1); }

int64_t fold_launch_count() { return fold_launches.load(); }

void count_fold_launch() { fold_launches.fetch_add(1); }

int64_t kcp_launch_count() { return kcp_launches.load(); }

void count_kcp_launch() { kcp_launches.fetch_add(1); }

std::vector<std::string> fused_kinds() {
  std::vector<std::string> kinds{"svd", "hsv", "tucker2"};
  if (fold_from_env()) kinds.insert(kinds.end(), {"cp", "ht2", "tt_tucker"});
  if (kcp_from_env()) kinds.push_back("kcp");
  return kinds;
}

}  // namespace cuda

namespace {

// Device time of one run on the current stream, from an idle stream to the
// end of its last kernel: for a host-bound path (the composite chain's several
// launches at batch 1) that includes the launch gaps, as an eager model sees them.
// (Raw events: ATen's CUDAEvent.h pulls in CUDAContext.h, which needs the
// cuSPARSE headers, absent from CI's toolkit.)
struct TimingEvent {
  cudaEvent_t e = nullptr;
  TimingEvent() { C10_CUDA_CHECK(cudaEventCreate(&e)); }
  ~TimingEvent() { cudaEventDestroy(e); }
  TimingEvent(const TimingEvent&) = delete;
  TimingEvent& operator=(const TimingEvent&) = delete;
};

double time_on_stream(const std::function<at::Tensor()>& fn, at::Tensor* out) {
  TimingEvent start, end;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(cudaEventRecord(start.e, stream));
  *out = fn();
  C10_CUDA_CHECK(cudaEventRecord(end.e, stream));
  C10_CUDA_CHECK(cudaEventSynchronize(end.e));
  float ms = 0.0f;
  C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start.e, end.e));
  return ms * 1e-3;
}

// The forward of both ops: conv2d (no tail), and conv2d_epilogue's conv with
// its tail, which the two-stage kernels take into their stores and every other
// path applies after the conv.
at::Tensor forward_cuda(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        c10::string_view kind, const cuda::Tail& tail) {
  auto after = [&](at::Tensor out) {
    // (checked again: the composite path has no plan to check against before it runs)
    if (tail.residual != nullptr) check_residual(*tail.residual, out.sizes(), input);
    cuda::epilogue_pass_(out, tail);
    return out;
  };
  const cuda::Impl impl = cuda::impl_from_env();
  if (impl == cuda::Impl::Composite) {
    return after(conv2d_composite(input, factors, bias, stride, padding, dilation, groups, kind));
  }
  const std::string k(kind);
  // make_plan validates every argument, so errors match the composite path.
  const Plan plan = make_plan(input, factors, bias, stride, padding, dilation, groups, k);
  // Before any kernel reads it beside its stores.
  if (tail.residual != nullptr) check_residual(*tail.residual, plan.out_shape, input);
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const bool two_stage = cuda::two_stage_supports(input, factors, plan, k);
  // Kinds that fold into the two-stage form (../fold_two_stage.h) run its kernels
  // on the folded factors where those support them, before any kernel of their own.
  std::optional<TwoStageFold> folded;
  Plan folded_plan;
  if (!two_stage && cuda::fold_from_env() && cuda::two_stage_dtype_supported(input.scalar_type())) {
    const int64_t r = fold_rank(factors, k);  // checked first: a product that cannot run is not computed
    if (r > 0 && r <= cuda::two_stage_max_rank()) {
      folded = fold_two_stage(factors, k, /*cache=*/!capturing);
      folded_plan = make_plan(input, folded->factors, bias, stride, padding, dilation, groups, folded->kind);
      if (!cuda::two_stage_supports(input, folded->factors, folded_plan, folded->kind)) folded.reset();
    }
  }
  KcpParams kcp_geometry;
  const bool kcp = k == "kcp" && cuda::kcp_from_env() && cuda::kcp_supports(input, factors, plan, k, &kcp_geometry);
  if (!two_stage && !folded && !kcp && !cuda::tucker2_supports(input, factors, plan, k)) {
    return after(chain_forward(input, factors, bias, plan));
  }
  auto fused = [&] {
    if (two_stage) return cuda::two_stage_forward(input, factors, bias, plan, k, tail);
    if (kcp) return after(cuda::kcp_forward(input, factors, bias, plan, kcp_geometry, /*cache=*/!capturing));
    if (!folded) return after(cuda::tucker2_forward(input, factors, bias, plan));
    at::Tensor y = cuda::two_stage_forward(input, folded->factors, bias, folded_plan, folded->kind, tail);
    cuda::count_fold_launch();
    return y;
  };
  if (impl == cuda::Impl::Fused || input.numel() == 0) return fused();
  auto composite = [&] { return after(chain_forward(input, factors, bias, plan)); };
  // The fold and the tail are part of what is timed: their keys differ from the plain conv's.
  const std::string key =
      auto_key(input, factors, bias, plan, k, std::string(folded ? "fold" : "") + (tail.any() ? " tail" : ""));
  const int cached = auto_cached(key);
  if (cached >= 0) return cached ? fused() : composite();
  // Timing synchronises the device, so only where the user asked for measured
  // choices (cudnn.benchmark, which makes cuDNN search its algorithms the same
  // way) and never while a CUDA graph is captured; otherwise a rule from the
  // H100 measurements (not cached: a later call under cudnn.benchmark times it).
  if (!at::globalContext().benchmarkCuDNN() || capturing) {
    if (two_stage) return cuda::two_stage_fused_by_default(input, factors, k) ? fused() : composite();
    if (folded) return cuda::two_stage_fused_by_default(input, folded->factors, folded->kind) ? fused() : composite();
    return composite();
  }
  const c10::cuda::CUDAGuard guard(input.device());
  return auto_time(key, fused, composite, time_on_stream);
}

at::Tensor conv2d_cuda(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       c10::string_view kind) {
  return forward_cuda(input, factors, bias, stride, padding, dilation, groups, kind, {});
}

at::Tensor conv2d_epilogue_cuda(const at::Tensor& input, at::TensorList factors,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, c10::string_view kind, bool relu) {
  if (!cuda::epilogue_from_env()) {  // the conv, then ATen's add_ and relu_
    return conv2d_epilogue_default(input, factors, bias, residual, stride, padding, dilation, groups, kind, relu);
  }
  const bool has_residual = residual.has_value() && residual->defined();
  cuda::Tail tail;
  tail.residual = has_residual ? &*residual : nullptr;
  tail.relu = relu;
  return forward_cuda(input, factors, bias, stride, padding, dilation, groups, kind, tail);
}

}  // namespace
}  // namespace hsv

TORCH_LIBRARY_IMPL(hsv, CUDA, m) {
  m.impl("conv2d", &hsv::conv2d_cuda);
  m.impl("conv2d_backward", &hsv::conv2d_backward_composite);
  m.impl("conv2d_epilogue", &hsv::conv2d_epilogue_cuda);
}
