// A factorized convolution, run as a chain of ordinary convolutions on views of
// the activation. Every kind (svd, hsv, ...) is described by a Plan: which factor
// feeds each stage, as what conv weight, on what view of the running activation.
// The same Plan drives the forward pass and a generic backward pass built from
// at::convolution_backward, so a new kind only has to say how to build its Plan.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <functional>
#include <string>
#include <vector>

namespace hsv {

using Pair = std::array<int64_t, 2>;

struct ConvParams {
  Pair stride;
  Pair padding;
  Pair dilation;
  int64_t groups;
};

struct Stage {
  int64_t factor;                      // index into the factor list
  std::vector<int64_t> weight_shape;   // the factor viewed as a conv weight
  std::vector<int64_t> in_view;        // the running activation viewed as this before the conv
  ConvParams conv;
  // Optional: the conv weight is the product of two factors, factors[factor] viewed as
  // (m, inner) times factors[right_factor] viewed as (inner, n), reshaped to weight_shape.
  // It lets a kind run two factors as one conv (computing the small product per call)
  // where that is cheaper than two stages; the backward pass splits the weight gradient.
  int64_t right_factor = -1;           // -1: the weight is factors[factor] alone
  int64_t inner = 0;
  // Optional: run a 1x1, stride-1, unpadded stage as one batched matmul per batch entry of
  // in_view instead of a conv. oneDNN's 1x1 conv ran 10-25x slower than the matmul on the
  // long, narrow views of kind "tt" (few channels, many rows).
  bool gemm = false;
};

struct Plan {
  std::vector<Stage> stages;
  std::vector<int64_t> out_shape;      // (N, Cout, Ho, Wo)
  int64_t out_channels;
};

// Checks the factor shapes of one kind against the input and builds its Plan.
// Throws c10::ValueError naming the offending factor and the expected shape.
using PlanBuilder = std::function<Plan(const at::Tensor& input, at::TensorList factors, const ConvParams& conv)>;

// Registry of the kinds the op accepts; kinds register themselves at load time.
void register_kind(const std::string& kind, PlanBuilder builder);
std::vector<std::string> known_kinds();

// Checks what every kind shares (input rank, dtypes, devices, bias, conv params)
// and then builds the kind's Plan.
Plan make_plan(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
               const std::string& kind);

// The conv parameters of a pointwise stage: 1x1, stride 1, no padding, one group.
inline const ConvParams kPointwise{{1, 1}, {0, 0}, {1, 1}, 1};

// A Plan without stages whose output is (N, out_channels, Ho, Wo) for a kh x kw
// conv of input under conv (Ho, Wo from conv_out_size, with its errors).
Plan plan_for_output(const at::Tensor& input, int64_t out_channels, int64_t kh, int64_t kw, const ConvParams& conv);

// Output size of one conv dimension, with a clear error when it is not positive.
int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation,
                      const char* dim_name);

// The memory format the op returns: channels_last when the input is, else contiguous.
at::MemoryFormat output_memory_format(const at::Tensor& input);

at::Tensor chain_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                         const Plan& plan);

std::tuple<at::Tensor, std::vector<at::Tensor>, c10::optional<at::Tensor>> chain_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList factors, bool has_bias,
    const Plan& plan, std::array<bool, 3> output_mask);

}  // namespace hsv
