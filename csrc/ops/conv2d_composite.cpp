#include "conv2d_composite.h"

#include "chain/conv_chain.h"

namespace hsv {

at::Tensor conv2d_composite(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups, c10::string_view kind) {
  const Plan plan = make_plan(input, factors, bias, stride, padding, dilation, groups, std::string(kind));
  return chain_forward(input, factors, bias, plan);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> conv2d_backward_composite(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList factors, bool has_bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, c10::string_view kind,
    std::array<bool, 3> output_mask) {
  const Plan plan = make_plan(input, factors, c10::nullopt, stride, padding, dilation, groups, std::string(kind));
  auto [gi, gf, gb] = chain_backward(grad_output, input, factors, has_bias, plan, output_mask);
  return {gi, gf, gb.has_value() ? *gb : at::Tensor()};
}

}  // namespace hsv
