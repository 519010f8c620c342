#include "conv_chain.h"

#include <c10/util/Exception.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <sstream>

namespace hsv {

namespace {

std::map<std::string, PlanBuilder>& registry() {
  static std::map<std::string, PlanBuilder> kinds;
  return kinds;
}

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}

Pair as_pair(at::IntArrayRef v, const char* name) {
  TORCH_CHECK_VALUE(v.size() == 2, "hsv::conv2d: ", name, " must have 2 elements, got ", v.size());
  return {v[0], v[1]};
}

}  // namespace

void register_kind(const std::string& kind, PlanBuilder builder) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry()[kind] = std::move(builder);
}

std::vector<std::string> known_kinds() {
  std::lock_guard<std::mutex> lock(registry_mutex());
  std::vector<std::string> out;
  for (const auto& kv : registry()) out.push_back(kv.first);
  return out;
}

int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation,
                      const char* dim_name) {
  // An empty image is refused as F.conv2d refuses it (only the batch may be empty), padded or not.
  TORCH_CHECK_VALUE(in > 0, "hsv::conv2d: input ", dim_name, " is 0; only the batch dimension may be empty");
  const int64_t span = dilation * (kernel - 1) + 1;
  const int64_t out = (in + 2 * padding - span) / stride + 1;
  TORCH_CHECK_VALUE(in + 2 * padding >= span && out > 0, "hsv::conv2d: input ", dim_name, " = ", in,
                    " with padding ", padding, " is smaller than the dilated kernel extent ", span);
  return out;
}

Plan plan_for_output(const at::Tensor& input, int64_t out_channels, int64_t kh, int64_t kw, const ConvParams& conv) {
  const int64_t ho = conv_out_size(input.size(2), kh, conv.stride[0], conv.padding[0], conv.dilation[0], "height");
  const int64_t wo = conv_out_size(input.size(3), kw, conv.stride[1], conv.padding[1], conv.dilation[1], "width");
  Plan plan;
  plan.out_channels = out_channels;
  plan.out_shape = {input.size(0), out_channels, ho, wo};
  return plan;
}

at::MemoryFormat output_memory_format(const at::Tensor& input) {
  return (input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous())
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

Plan make_plan(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
               const std::string& kind) {
  PlanBuilder builder;
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto it = registry().find(kind);
    if (it != registry().end()) builder = it->second;
  }
  if (!builder) {
    std::ostringstream names;
    for (const auto& k : known_kinds()) names << " '" << k << "'";
    TORCH_CHECK_VALUE(false, "hsv::conv2d: unknown kind '", kind, "'; expected one of:", names.str());
  }
  TORCH_CHECK_VALUE(input.dim() == 4, "hsv::conv2d: input must be 4-D (N, C, H, W), got ", input.dim(),
                    "-D with shape ", input.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()),
                    "hsv::conv2d: input must be a floating point tensor, got ", input.scalar_type());
  TORCH_CHECK_VALUE(!factors.empty(), "hsv::conv2d: factors is empty; kind '", kind,
                    "' needs its factor tensors");
  for (size_t i = 0; i < factors.size(); ++i) {
    TORCH_CHECK_VALUE(factors[i].scalar_type() == input.scalar_type(), "hsv::conv2d: factors[", i,
                      "] has dtype ", factors[i].scalar_type(), " but input has dtype ", input.scalar_type());
    TORCH_CHECK_VALUE(factors[i].device() == input.device(), "hsv::conv2d: factors[", i, "] is on ",
                      factors[i].device(), " but input is on ", input.device());
  }
  ConvParams conv{as_pair(stride, "stride"), as_pair(padding, "padding"), as_pair(dilation, "dilation"), groups};
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK_VALUE(conv.stride[d] > 0, "hsv::conv2d: stride must be positive, got ", stride);
    TORCH_CHECK_VALUE(conv.padding[d] >= 0, "hsv::conv2d: padding must be non-negative, got ", padding);
    TORCH_CHECK_VALUE(conv.dilation[d] > 0, "hsv::conv2d: dilation must be positive, got ", dilation);
  }
  TORCH_CHECK_VALUE(groups >= 1, "hsv::conv2d: groups must be positive, got ", groups);
  TORCH_CHECK_VALUE(input.size(1) % groups == 0, "hsv::conv2d: input channels (", input.size(1),
                    ") are not divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(groups == 1, "hsv::conv2d: kind '", kind, "' supports groups=1 only, got groups=", groups);

  Plan plan = builder(input, factors, conv);

  if (bias.has_value() && bias->defined()) {
    const auto& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == plan.out_channels, "hsv::conv2d: bias must have shape (",
                      plan.out_channels, ",) to match the output channels, got ", b.sizes());
    TORCH_CHECK_VALUE(b.scalar_type() == input.scalar_type(), "hsv::conv2d: bias has dtype ", b.scalar_type(),
                      " but input has dtype ", input.scalar_type());
    TORCH_CHECK_VALUE(b.device() == input.device(), "hsv::conv2d: bias is on ", b.device(),
                      " but input is on ", input.device());
  }
  return plan;
}

namespace {

// x viewed as shape; x itself when its sizes already are shape. reshape() recomputes
// the strides of size-1 dims (a batch-1 channels_last activation's N stride becomes
// its C stride), after which suggest_memory_format() no longer sees channels_last and
// the conv backend copies the activation to NCHW first: 10x slower on a batch-1 1x1
// tucker2 layer (5.7 ms against 0.53 ms), measured.
at::Tensor as_shape(const at::Tensor& x, at::IntArrayRef shape) { return x.sizes() == shape ? x : x.reshape(shape); }

at::Tensor stage_weight(at::TensorList factors, const Stage& st) {
  if (st.right_factor < 0) return factors[st.factor].reshape(st.weight_shape);
  return at::matmul(factors[st.factor].reshape({-1, st.inner}), factors[st.right_factor].reshape({st.inner, -1}))
      .reshape(st.weight_shape);
}

void accumulate(std::vector<at::Tensor>& grad_factors, int64_t index, const at::Tensor& grad) {
  auto& slot = grad_factors[index];
  slot = slot.defined() ? slot + grad : grad;
}

bool is_pointwise(const Stage& st) {
  const auto& c = st.conv;
  return st.weight_shape.size() == 4 && st.weight_shape[2] == 1 && st.weight_shape[3] == 1 && c.groups == 1 &&
         c.stride == Pair{1, 1} && c.padding == Pair{0, 0} && c.dilation == Pair{1, 1};
}

// (B, m, k) @ (B, k, n) with one (m, k) matrix for every batch entry. bmm on the expanded
// (stride-0) matrix; at::matmul(2-D, 3-D) instead copies both operands into a folded GEMM
// and was up to 2x slower on tt's views.
at::Tensor shared_bmm(const at::Tensor& matrix, const at::Tensor& batch) {
  return at::bmm(matrix.expand({batch.size(0), matrix.size(0), matrix.size(1)}), batch);
}

// A gemm stage: the (B, Cin, H, W) view as (B, Cin, H*W), times the (Cout, Cin) weight.
at::Tensor run_gemm(const at::Tensor& x, const at::Tensor& w, const Stage& st) {
  TORCH_INTERNAL_ASSERT(is_pointwise(st), "hsv::conv2d: a gemm stage must be a 1x1 conv without stride/padding");
  const auto& v = st.in_view;
  const int64_t cout = st.weight_shape[0];
  return shared_bmm(w.reshape({cout, v[1]}), x.reshape({v[0], v[1], v[2] * v[3]})).reshape({v[0], cout, v[2], v[3]});
}

// x with its size-1 channel dim given its NCHW stride (a view, no copy: a size-1 dim's
// stride is free). oneDNN (at::conv2d on CPU, torch 2.14.1) gets a conv with one input channel
// wrong when it runs it channels_last, which ATen does when x.stride(1) <= x.stride(3): input
// (2, 1, 3, 4) strides (12, 1, 4, 1) (channels_last, or a channels_last slice (24, 1, 8, 2)),
// weight (1, 1, 2, 4), stride (1, 3) reads garbage into every output row but the first at 2
// threads, at 1 thread too from batch 4 (seen where the output is one column wide and the
// column stride > 1). Its NCHW path is right. The weight needs nothing: stage_weight's reshape
// already gives its size-1 dims NCHW strides. convolution_backward was not affected.
at::Tensor nchw_single_channel(const at::Tensor& x) {
  if (x.size(1) != 1 || !x.is_cpu()) return x;
  const int64_t nchw = std::max(x.size(2) * x.stride(2), x.size(3) * x.stride(3));
  if (x.stride(1) == nchw) return x;
  std::vector<int64_t> strides = x.strides().vec();
  strides[1] = nchw;
  return x.as_strided(x.sizes(), strides, x.storage_offset());
}

at::Tensor run_stage(const at::Tensor& x, at::TensorList factors, const Stage& st) {
  const auto& c = st.conv;
  if (st.gemm) return run_gemm(x, stage_weight(factors, st), st);
  return at::conv2d(nchw_single_channel(x), stage_weight(factors, st), {}, c.stride, c.padding, c.dilation,
                    c.groups);
}

// Input and weight gradients of a gemm stage (what convolution_backward gives for a conv stage).
std::tuple<at::Tensor, at::Tensor> gemm_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                 const Stage& st, bool need_input, bool need_weight) {
  const auto& v = st.in_view;
  const int64_t cout = st.weight_shape[0], rows = v[2] * v[3];
  const at::Tensor g3 = g.reshape({v[0], cout, rows});
  at::Tensor grad_input, grad_weight;
  if (need_input) grad_input = shared_bmm(w.reshape({cout, v[1]}).t(), g3).reshape(v);
  if (need_weight) grad_weight = at::bmm(g3, x.reshape({v[0], v[1], rows}).transpose(1, 2)).sum(0);
  return {grad_input, grad_weight};
}

}  // namespace

at::Tensor chain_forward(const at::Tensor& input, at::TensorList factors, const c10::optional<at::Tensor>& bias,
                         const Plan& plan) {
  at::Tensor x = input;
  for (const auto& st : plan.stages) x = run_stage(as_shape(x, st.in_view), factors, st);
  x = as_shape(x, plan.out_shape);
  if (bias.has_value() && bias->defined()) x = x + bias->view({1, plan.out_channels, 1, 1});
  return x.contiguous(output_memory_format(input));
}

std::tuple<at::Tensor, std::vector<at::Tensor>, c10::optional<at::Tensor>> chain_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList factors, bool has_bias,
    const Plan& plan, std::array<bool, 3> output_mask) {
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(plan.out_shape),
                    "hsv::conv2d_backward: grad_output has shape ", grad_output.sizes(), ", expected ",
                    at::IntArrayRef(plan.out_shape));
  // Recompute the stage inputs: the forward op keeps nothing but its output.
  std::vector<at::Tensor> stage_inputs;
  std::vector<std::vector<int64_t>> pre_view_shapes;
  at::Tensor x = input;
  for (const auto& st : plan.stages) {
    pre_view_shapes.push_back(x.sizes().vec());
    stage_inputs.push_back(as_shape(x, st.in_view));
    x = run_stage(stage_inputs.back(), factors, st);
  }
  std::vector<at::Tensor> grad_factors(factors.size());
  at::Tensor g = as_shape(grad_output, x.sizes());
  const bool need_factors = output_mask[1];
  for (int64_t i = static_cast<int64_t>(plan.stages.size()) - 1; i >= 0; --i) {
    const auto& st = plan.stages[i];
    const auto& c = st.conv;
    const bool need_input = i > 0 || output_mask[0];
    if (!need_input && !need_factors) break;
    at::Tensor w = stage_weight(factors, st);
    at::Tensor grad_in, gw;
    if (st.gemm) {
      std::tie(grad_in, gw) = gemm_backward(g, stage_inputs[i], w, st, need_input, need_factors);
    } else {
      at::Tensor in = stage_inputs[i], gi = g;
      // oneDNN's 1x1 strided backward (torch 2.14.1, AVX2) writes past a heap buffer on channels_last
      // input with some channel counts (valgrind: 5 -> 6 channels at stride 2, (1, 2) and (2, 1);
      // 64 -> 128 was clean), a later free() then aborts. Its NCHW path is clean: copy these to it.
      if (in.is_cpu() && st.weight_shape[2] == 1 && st.weight_shape[3] == 1 &&
          (c.stride[0] != 1 || c.stride[1] != 1) && !in.is_contiguous()) {
        in = in.contiguous();
        gi = g.contiguous();
      }
      auto grads = at::convolution_backward(gi, in, w, c10::nullopt, c.stride, c.padding, c.dilation,
                                            /*transposed=*/false, /*output_padding=*/{0, 0}, c.groups,
                                            {need_input, need_factors, false});
      grad_in = std::get<0>(grads);
      gw = std::get<1>(grads);
    }
    if (need_factors) {
      if (st.right_factor < 0) {
        accumulate(grad_factors, st.factor, gw.reshape(factors[st.factor].sizes()));
      } else {  // weight = L @ R: dL = dW @ R^T, dR = L^T @ dW
        const at::Tensor left = factors[st.factor].reshape({-1, st.inner});
        const at::Tensor right = factors[st.right_factor].reshape({st.inner, -1});
        const at::Tensor gw2 = gw.reshape({left.size(0), right.size(1)});
        accumulate(grad_factors, st.factor, at::matmul(gw2, right.t()).reshape(factors[st.factor].sizes()));
        accumulate(grad_factors, st.right_factor, at::matmul(left.t(), gw2).reshape(factors[st.right_factor].sizes()));
      }
    }
    if (need_input) g = as_shape(grad_in, pre_view_shapes[i]);
  }
  at::Tensor grad_input;
  if (output_mask[0]) grad_input = as_shape(g, input.sizes()).contiguous(output_memory_format(input));
  if (need_factors) {
    for (size_t f = 0; f < factors.size(); ++f) {
      grad_factors[f] = grad_factors[f].defined() ? grad_factors[f].contiguous() : at::zeros_like(factors[f], at::MemoryFormat::Contiguous);
    }
  } else {
    grad_factors.clear();
  }
  c10::optional<at::Tensor> grad_bias;
  if (has_bias && output_mask[2]) grad_bias = grad_output.sum({0, 2, 3});
  return {grad_input, grad_factors, grad_bias};
}

}  // namespace hsv
