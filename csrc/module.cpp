// hsvkernels._C: loading it registers the hsv ops (static TORCH_LIBRARY blocks);
// the pybind11 functions here report how the extension was built and
// measure this CPU's FMA peak and microkernel speed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include "ops/auto_select.h"
#include "ops/fold_two_stage.h"
#include "ops/kcp_cta_emulate.h"
#include "ops/chain/conv_chain.h"
#include "ops/cpu/isa.h"
#ifdef WITH_CUDA
#include "ops/cuda/cuda_impl.h"
#include "ops/cuda/kcp_cuda.h"
#include "ops/cuda/two_stage_mma.h"
#include "ops/cuda/two_stage_wgmma.h"
#endif
#include "ops/cpu/channels_last_copy.h"
#include "ops/cpu/hsv_fused.h"
#include "ops/cpu/im2col_panels.h"
#include "ops/cpu/pack.h"
#include "ops/cpu/peak.h"
#include "ops/cpu/pointwise_nchw.h"

#ifndef HSV_TORCH_VERSION
#define HSV_TORCH_VERSION "unknown"
#endif
#ifndef HSV_CUDA_VERSION
#define HSV_CUDA_VERSION ""
#endif
#ifndef HSV_CUDA_ARCHS
#define HSV_CUDA_ARCHS ""
#endif

namespace py = pybind11;

// The CUDA-side value, or `fallback` in a build without CUDA kernels (where
// the hsv::cuda functions do not exist).
#ifdef WITH_CUDA
#define HSV_CUDA_OR(value, fallback) (value)
#else
#define HSV_CUDA_OR(value, fallback) (fallback)
#endif

namespace {

py::dict build_info() {
  py::dict info;
  info["torch_version"] = HSV_TORCH_VERSION;
#ifdef WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_version"] = HSV_CUDA_VERSION;
  info["cuda_archs"] = HSV_CUDA_ARCHS;
  // cuda_sm90a: the wgmma kernel's sm_90a code is in this build (HSV_CUDA_NHWC=wgmma can run it)
  info["cuda_sm90a"] = hsv::cuda::wgmma_built();
#else
  info["with_cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = "";
  info["cuda_sm90a"] = false;
#endif
  // cpu_avx2 / cpu_avx512: the fused kernels' microkernel for that ISA is in this
  // build; cpu_isa: the one this CPU runs (HSV_CPU_ISA can force a lesser one).
  // cpu_kernels: what HSV_CPU_IMPL selects by default, and what else exists.
  info["cpu_avx2"] = hsv::cpu::microkernel_avx2() != nullptr;
  info["cpu_avx512"] = hsv::cpu::microkernel_avx512() != nullptr;
  info["cpu_isa"] = hsv::cpu::best_isa();
  // Whether at::parallel_for in this extension's kernels can use more than one
  // thread: with an OpenMP torch it needs the extension built with -fopenmp.
#ifdef _OPENMP
  info["cpu_openmp"] = true;
#else
  info["cpu_openmp"] = false;
#endif
  info["cpu_kernels"] = "fused";
  // tucker2, ht2 and tt_tucker: oneDNN convs for the first stages, the fused svd kernel for the rest
  info["cpu_fused_kinds"] = std::vector<std::string>{"svd", "hsv", "tucker2", "kcp", "ht2", "tt_tucker"};
  // cuda_kernels: what HSV_CUDA_IMPL selects by default (the faster of fused and
  // composite, timed under cudnn.benchmark, else by a measured rule); cuda_fused_kinds: the kinds
  // HSV_CUDA_IMPL=fused runs fused (where dtype and shape allow).
  info["cuda_kernels"] = "auto";
#ifdef WITH_CUDA
  info["cuda_fused_kinds"] = hsv::cuda::fused_kinds();
#else
  info["cuda_fused_kinds"] = std::vector<std::string>{};
#endif
  info["kinds"] = hsv::known_kinds();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hsvkernels native extension: registers torch.ops.hsv.* and reports build info";
  m.def("build_info", &build_info, "How this extension was built: versions, CUDA archs, CPU paths, kinds");
  m.def("cuda_fused_launch_count", []() -> int64_t { return HSV_CUDA_OR(hsv::cuda::fused_launch_count(), 0); },
        "How many fused CUDA kernels this process launched (tells a fused run from a fallback)");
  m.def("cpu_pointwise_nchw_runs", &hsv::cpu::pointwise_nchw_runs,
        "How many times the fused CPU path ran a 1x1 layer on NCHW input with pixels as the vector axis");
  m.def("cpu_im2col_panels_runs", &hsv::cpu::im2col_panels_runs,
        "How many times the fused CPU path ran a conv with few input channels on NCHW input with pixels as the "
        "vector axis");
  m.def("cpu_conv_tap_group_runs", &hsv::cpu::conv_tap_group_runs,
        "How many times the fused CPU path ran a conv stage with several taps per microkernel call");
  m.def("cuda_nhwc_launch_count", []() -> int64_t { return HSV_CUDA_OR(hsv::cuda::nhwc_launch_count(), 0); },
        "How many of those took the two-stage kernel's channels_last fast path");
  m.def("cuda_mma_launch_count", []() -> int64_t { return HSV_CUDA_OR(hsv::cuda::mma_launch_count(), 0); },
        "How many of those ran the Hopper mma.sync kernel (sm_90) rather than the WMMA one");
  m.def("cuda_mma_last_config", []() {
    return HSV_CUDA_OR(hsv::cuda::mma_last_config(), std::vector<int64_t>{});
  },
        "The last mma-kernel launch's (pixel fragments per warp, cluster CTAs splitting K, pixel tiles, K step)");
  m.def("cuda_wgmma_launch_count", []() -> int64_t { return HSV_CUDA_OR(hsv::cuda::wgmma_launch_count(), 0); },
        "How many fused launches ran the wgmma kernel (sm_90a, HSV_CUDA_NHWC=wgmma)");
  m.def("cuda_fold_launch_count", []() -> int64_t { return HSV_CUDA_OR(hsv::cuda::fold_launch_count(), 0); },
        "How many fused launches ran factors folded into the two-stage form (HSV_CUDA_FOLD=on)");
  m.def("cuda_kcp_launch_count", []() -> int64_t { return HSV_CUDA_OR(hsv::cuda::kcp_launch_count(), 0); },
        "How many fused launches ran the kcp kernel (HSV_CUDA_KCP=on)");
  m.def("cuda_kcp_last_config", []() {
    return HSV_CUDA_OR(hsv::cuda::kcp_last_config(), std::vector<int64_t>{});
  },
        "The last kcp-kernel launch's (tile rows, tile columns, qn block, splits, shared-memory bytes)");
  m.def("cuda_wgmma_last_config", []() {
    return HSV_CUDA_OR(hsv::cuda::wgmma_last_config(), std::vector<int64_t>{});
  },
        "The last wgmma-kernel launch's (warpgroups per CTA, cluster CTAs splitting K, pixel tiles, K step)");
  // Both release the GIL: they only spin on the calling thread.
  m.def("fma_peak_gflops", &hsv::cpu::fma_peak_gflops, py::arg("isa"), py::arg("seconds") = 0.5,
        py::call_guard<py::gil_scoped_release>(),
        "Single-core fp32 FMA peak (GFLOP/s) for isa 'avx512', 'avx2' or 'scalar': best chunk of a ~seconds run");
  m.def("microkernel_gflops", &hsv::cpu::microkernel_gflops, py::arg("isa"), py::arg("k") = 128,
        py::arg("seconds") = 0.5, py::arg("variant") = "wide", py::call_guard<py::gil_scoped_release>(),
        "GFLOP/s of the fused kernels' MR x NR microkernel (variant 'wide', 'narrow', 'three', 'strided', "
        "'strided_short', 'b_rows' or 'b_rows_short') on L1-resident operands, K = k");
  m.def("clear_packed_cache", &hsv::cpu::clear_packed_cache,
        "Drops the fused CPU kernels' packed factors (needed only after writes that bypass the version counter, "
        "e.g. through .data); returns how many there were");
  m.def("auto_choices", &hsv::auto_choices,
        "HSV_CPU_IMPL=auto and HSV_CUDA_IMPL=auto: the path ('fused' or 'composite') timed faster for each layer "
        "configuration so far (keys start with the device)");
  m.def("clear_auto_choices", &hsv::clear_auto_choices,
        "Forgets the auto choices (the next call of each configuration times again)");
  m.def("cpu_to_channels_last", &hsv::cpu::to_channels_last_selected, py::arg("x"),
        "The fused CPU kernels' NCHW -> NHWC copy with the HSV_CPU_ISA microkernel's transpose (for tests)");
  m.def("packed_cache_size", &hsv::cpu::packed_cache_size, "How many packed factors the fused CPU kernels cache");
  m.def("fold_two_stage", [](const std::vector<at::Tensor>& factors, const std::string& kind, bool cache)
            -> std::optional<std::pair<std::string, std::vector<at::Tensor>>> {
    const auto folded = hsv::fold_two_stage(factors, kind, cache);
    if (!folded) return std::nullopt;
    return std::make_pair(folded->kind, folded->factors);
  }, py::arg("factors"), py::arg("kind"), py::arg("cache") = true,
     "(kind, factors) of the two-stage form ('svd', or 'hsv' level 1) that the fused CUDA kernels run for these "
     "factors (HSV_CUDA_FOLD=on), or None where the kind does not fold; the factors must be valid for kind "
     "(for tests)");
  m.def("kcp_cta_emulate", [](const at::Tensor& input, const std::vector<at::Tensor>& factors,
                              const c10::optional<at::Tensor>& bias, const std::vector<int64_t>& stride,
                              const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                              int64_t tile_h, int64_t tile_w, int64_t nb, int64_t splits, bool reverse) {
    return hsv::kcp_cta_emulate(input, factors, bias, stride, padding, dilation, tile_h, tile_w, nb, splits, reverse);
  }, py::arg("input"), py::arg("factors"), py::arg("bias"), py::arg("stride"), py::arg("padding"),
     py::arg("dilation"), py::arg("tile_h") = 0, py::arg("tile_w") = 0, py::arg("nb") = 0, py::arg("splits") = 0,
     py::arg("reverse") = false,
     py::call_guard<py::gil_scoped_release>(),
     "The fused kcp CUDA kernel's CTA program run on the CPU (fp16/bf16 CPU tensors), with a forced tile "
     "(tile_h, tile_w, nb, splits) or the H100 cost model's; for tests on machines without a GPU");
  m.def("kcp_cta_tile", [](const at::Tensor& input, const std::vector<at::Tensor>& factors,
                           const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                           const std::vector<int64_t>& dilation, int64_t smem_limit, int64_t sms) {
    return hsv::kcp_cta_tile(input, factors, stride, padding, dilation, smem_limit, sms);
  }, py::arg("input"), py::arg("factors"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
     py::arg("smem_limit") = 227 * 1024, py::arg("sms") = 132,
     "(tile_h, tile_w, nb, splits, shared-memory bytes) the fused kcp CUDA kernel's cost model picks (for tests)");
  m.def("fold_rank", [](const std::vector<at::Tensor>& factors, const std::string& kind) {
    return hsv::fold_rank(factors, kind);
  }, py::arg("factors"), py::arg("kind"),
        "The rank of the folded form's intermediate, 0 where the kind does not fold (for tests)");
  m.def("cpu_conv_panel_widths", [](int64_t rank) {
    TORCH_CHECK_VALUE(rank >= 1, "cpu_conv_panel_widths: rank must be >= 1, got ", rank);
    return hsv::cpu::panel_widths(hsv::cpu::select_microkernel(), rank, true, true);
  }, py::arg("rank"), "The column widths of the panels the fused CPU conv stage cuts for N = rank under HSV_CPU_ISA "
     "(for tests)");
}
