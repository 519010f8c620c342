// hsvkernels._C: loading it registers the hsv ops (static TORCH_LIBRARY blocks);
// the pybind11 functions here only report how the extension was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ops/chain/conv_chain.h"

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

namespace {

py::dict build_info() {
  py::dict info;
  info["torch_version"] = HSV_TORCH_VERSION;
#ifdef WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_version"] = HSV_CUDA_VERSION;
  info["cuda_archs"] = HSV_CUDA_ARCHS;
#else
  info["with_cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = "";
#endif
  // Fused CPU kernels with AVX2 / AVX-512 paths are not part of this build yet:
  // the CPU kernels are the unfused ATen chain.
  info["cpu_avx2"] = false;
  info["cpu_avx512"] = false;
  info["cpu_kernels"] = "composite";
  info["cuda_kernels"] = "composite";
  info["kinds"] = hsv::known_kinds();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hsvkernels native extension: registers torch.ops.hsv.* and reports build info";
  m.def("build_info", &build_info, "How this extension was built: versions, CUDA archs, CPU paths, kinds");
}
