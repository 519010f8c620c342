#include "epilogue.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace hsv {

void check_residual(const at::Tensor& residual, at::IntArrayRef out_shape, const at::Tensor& input) {
  TORCH_CHECK_VALUE(residual.sizes() == out_shape, "hsv::conv2d_epilogue: residual must have the conv output's "
                    "shape ", out_shape, ", got ", residual.sizes());
  TORCH_CHECK_VALUE(residual.scalar_type() == input.scalar_type(), "hsv::conv2d_epilogue: residual has dtype ",
                    residual.scalar_type(), " but the conv output has dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(residual.device() == input.device(), "hsv::conv2d_epilogue: residual is on ",
                    residual.device(), " but the conv output is on ", input.device());
}

namespace {

template <typename T>
void span_of(T* o, const T* r, int64_t n, bool relu) {
  // `v < 0 ? 0 : v` keeps NaN (a comparison with NaN is false), like torch.relu.
  if (r != nullptr && relu) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = o[i] + r[i];
      o[i] = v < T(0) ? T(0) : v;
    }
  } else if (r != nullptr) {
    for (int64_t i = 0; i < n; ++i) o[i] += r[i];
  } else {
    for (int64_t i = 0; i < n; ++i) o[i] = o[i] < T(0) ? T(0) : o[i];
  }
}

}  // namespace

void apply_epilogue_(at::Tensor& out, const c10::optional<at::Tensor>& residual, bool relu) {
  const bool has_residual = residual.has_value() && residual->defined();
  if ((!has_residual && !relu) || out.numel() == 0) return;
  // One pass over memory when out and residual lie the same way (both NCHW or both channels_last,
  // the usual case); otherwise ATen's elementwise ops handle the strides.
  const bool one_pass = out.device().is_cpu() && out.is_non_overlapping_and_dense() &&
                        (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble) &&
                        (!has_residual || residual->strides() == out.strides());
  if (!one_pass) {
    if (has_residual) out.add_(*residual);
    if (relu) out.relu_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "hsv_conv2d_epilogue", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* r = has_residual ? residual->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, out.numel(), 32768, [&](int64_t begin, int64_t end) {
      span_of<scalar_t>(o + begin, r == nullptr ? nullptr : r + begin, end - begin, relu);
    });
  });
}

void epilogue_span(float* o, const float* r, int64_t n, bool relu) { span_of<float>(o, r, n, relu); }

// The CPU backend overrides this (cpu/conv2d_cpu.cpp); CUDA calls it unless HSV_CUDA_EPILOGUE=on.
at::Tensor conv2d_epilogue_default(const at::Tensor& input, at::TensorList factors,
                                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, c10::string_view kind, bool relu) {
  static auto conv = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("hsv::conv2d", "")
                         .typed<at::Tensor(const at::Tensor&, at::TensorList, const c10::optional<at::Tensor>&,
                                           at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                           c10::string_view)>();
  at::Tensor out = conv.call(input, factors, bias, stride, padding, dilation, groups, kind);
  if (residual.has_value() && residual->defined()) check_residual(*residual, out.sizes(), input);
  apply_epilogue_(out, residual, relu);
  return out;
}

}  // namespace hsv

TORCH_LIBRARY_IMPL(hsv, CompositeExplicitAutograd, m) {
  m.impl("conv2d_epilogue", &hsv::conv2d_epilogue_default);
}
