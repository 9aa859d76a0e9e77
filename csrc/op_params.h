// The parameter list of each op, typed once: every definition of an op (the C++ API, each
// backend, autograd, the composite and in-place kernels) spells its parameters through these,
// and a static_assert holds each to the declaration in include/custom_bn/ops.h, so that the
// schema (csrc/schemas.cpp), the public declaration and this list cannot drift apart.
#pragma once

#include <custom_bn/ops.h>

#include <type_traits>

// clang-format off
// The input and its per-channel tensors, as every forward takes them.
#define CUSTOM_BN_INPUT_AND_CHANNEL_PARAMS \
  const at::Tensor& input, \
  const std::optional<at::Tensor>& weight, \
  const std::optional<at::Tensor>& bias, \
  const std::optional<at::Tensor>& running_mean, \
  const std::optional<at::Tensor>& running_var

// What every backward normalizes with, after its gradient and input tensors.
#define CUSTOM_BN_BACKWARD_STATS_PARAMS \
  const std::optional<at::Tensor>& weight, \
  const std::optional<at::Tensor>& running_mean, \
  const std::optional<at::Tensor>& running_var, \
  const at::Tensor& save_mean, \
  const at::Tensor& save_invstd, \
  bool training, \
  double eps

// The fused ops' activation: ATen's hardtanh (min_val, max_val) and leaky_relu (negative_slope)
// parameters in one piecewise-linear function, or a smooth one by name (csrc/activation.h).
#define CUSTOM_BN_ACTIVATION_PARAMS \
  double min_val, std::optional<double> max_val, double negative_slope, \
  c10::string_view activation
#define CUSTOM_BN_ACTIVATION_ARGS min_val, max_val, negative_slope, activation

#define CUSTOM_BN_BATCH_NORM_PARAMS \
  CUSTOM_BN_INPUT_AND_CHANNEL_PARAMS, bool training, std::optional<double> momentum, double eps, \
  const std::optional<at::Tensor>& num_batches_tracked

#define CUSTOM_BN_BATCH_NORM_RELU_PARAMS \
  CUSTOM_BN_BATCH_NORM_PARAMS, const std::optional<at::Tensor>& residual, \
  CUSTOM_BN_ACTIVATION_PARAMS

#define CUSTOM_BN_BATCH_NORM_FORWARD_PARAMS \
  CUSTOM_BN_INPUT_AND_CHANNEL_PARAMS, const std::optional<at::Tensor>& num_batches_tracked, \
  bool training, std::optional<double> momentum, double eps

#define CUSTOM_BN_BATCH_NORM_RELU_FORWARD_PARAMS \
  CUSTOM_BN_INPUT_AND_CHANNEL_PARAMS, const std::optional<at::Tensor>& num_batches_tracked, \
  const std::optional<at::Tensor>& residual, bool training, std::optional<double> momentum, \
  double eps, CUSTOM_BN_ACTIVATION_PARAMS

#define CUSTOM_BN_BATCH_NORM_EVAL_PARAMS \
  const at::Tensor& input, const std::optional<at::Tensor>& weight, \
  const std::optional<at::Tensor>& bias, const at::Tensor& running_mean, \
  const at::Tensor& running_var, double eps, bool relu, const std::optional<at::Tensor>& residual, \
  CUSTOM_BN_ACTIVATION_PARAMS
#define CUSTOM_BN_BATCH_NORM_BACKWARD_PARAMS \
  const at::Tensor& grad_output, const at::Tensor& input, CUSTOM_BN_BACKWARD_STATS_PARAMS, \
  std::array<bool, 3> output_mask

#define CUSTOM_BN_BATCH_NORM_RELU_BACKWARD_PARAMS \
  const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input, \
  CUSTOM_BN_BACKWARD_STATS_PARAMS, std::array<bool, 4> output_mask, CUSTOM_BN_ACTIVATION_PARAMS, \
  const std::optional<at::Tensor>& bias

// In place: only the piecewise-linear activations, which the output inverts.
#define CUSTOM_BN_INPLACE_ACTIVATION_PARAMS \
  double min_val, std::optional<double> max_val, double negative_slope
#define CUSTOM_BN_INPLACE_ACTIVATION_ARGS min_val, max_val, negative_slope

#define CUSTOM_BN_BATCH_NORM_RELU_INPLACE_PARAMS \
  at::Tensor& input, const std::optional<at::Tensor>& weight, \
  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean, \
  const std::optional<at::Tensor>& running_var, bool training, std::optional<double> momentum, \
  double eps, const std::optional<at::Tensor>& num_batches_tracked, \
  const std::optional<at::Tensor>& residual, CUSTOM_BN_INPLACE_ACTIVATION_PARAMS

#define CUSTOM_BN_BATCH_NORM_RELU_FORWARD_INPLACE_PARAMS \
  at::Tensor& input, const std::optional<at::Tensor>& weight, \
  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean, \
  const std::optional<at::Tensor>& running_var, \
  const std::optional<at::Tensor>& num_batches_tracked, \
  const std::optional<at::Tensor>& residual, bool training, std::optional<double> momentum, \
  double eps, CUSTOM_BN_INPLACE_ACTIVATION_PARAMS, bool keep_input

#define CUSTOM_BN_BATCH_NORM_RELU_INPLACE_BACKWARD_PARAMS \
  const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& kept_input, \
  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, \
  const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean, \
  const std::optional<at::Tensor>& running_var, const at::Tensor& save_mean, \
  const at::Tensor& save_invstd, bool training, double eps, std::array<bool, 4> output_mask, \
  CUSTOM_BN_INPLACE_ACTIVATION_PARAMS

#define CUSTOM_BN_BATCH_NORM_STATS_PARAMS const at::Tensor& input

#define CUSTOM_BN_BATCH_NORM_GATHER_STATS_WITH_COUNTS_PARAMS \
  const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& counts, \
  const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, \
  const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum, \
  double eps

#define CUSTOM_BN_BATCH_NORM_ELEMT_PARAMS \
  const at::Tensor& input, const std::optional<at::Tensor>& weight, \
  const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd

#define CUSTOM_BN_BATCH_NORM_BACKWARD_REDUCE_PARAMS \
  const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, \
  const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool input_g, \
  bool weight_g, bool bias_g

#define CUSTOM_BN_BATCH_NORM_BACKWARD_ELEMT_PARAMS \
  const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, \
  const at::Tensor& invstd, const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy, \
  const at::Tensor& sum_dy_xmu, const at::Tensor& count

#define CUSTOM_BN_BATCH_NORM_RELU_NORMALIZED_INPUT_PARAMS \
  const at::Tensor& output, const at::Tensor& kept_input, const std::optional<at::Tensor>& weight, \
  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, \
  const at::Tensor& mean, const at::Tensor& invstd, CUSTOM_BN_INPLACE_ACTIVATION_PARAMS
// clang-format on

namespace custom_bn::detail {

template <typename Function>
struct ReturnType;
template <typename Result, typename... Args>
struct ReturnType<Result(Args...)> {
  using type = Result;
};

// Each list, as a function type, is the type of the public declaration.
#define CUSTOM_BN_CHECK_PARAMS(op, ...)                                                            \
  static_assert(std::is_same_v<decltype(::custom_bn::op),                                          \
                               typename ReturnType<decltype(::custom_bn::op)>::type(__VA_ARGS__)>, \
                #op                                                                                \
                ": its parameter list in csrc/op_params.h differs from include/custom_bn/ops.h")

CUSTOM_BN_CHECK_PARAMS(batch_norm, CUSTOM_BN_BATCH_NORM_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_forward, CUSTOM_BN_BATCH_NORM_FORWARD_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_eval, CUSTOM_BN_BATCH_NORM_EVAL_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_backward, CUSTOM_BN_BATCH_NORM_BACKWARD_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_relu, CUSTOM_BN_BATCH_NORM_RELU_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_relu_forward, CUSTOM_BN_BATCH_NORM_RELU_FORWARD_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_relu_backward, CUSTOM_BN_BATCH_NORM_RELU_BACKWARD_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_relu_, CUSTOM_BN_BATCH_NORM_RELU_INPLACE_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_relu_forward_, CUSTOM_BN_BATCH_NORM_RELU_FORWARD_INPLACE_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_relu_inplace_backward,
                       CUSTOM_BN_BATCH_NORM_RELU_INPLACE_BACKWARD_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_stats, CUSTOM_BN_BATCH_NORM_STATS_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_gather_stats_with_counts,
                       CUSTOM_BN_BATCH_NORM_GATHER_STATS_WITH_COUNTS_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_elemt, CUSTOM_BN_BATCH_NORM_ELEMT_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_backward_reduce, CUSTOM_BN_BATCH_NORM_BACKWARD_REDUCE_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_backward_elemt, CUSTOM_BN_BATCH_NORM_BACKWARD_ELEMT_PARAMS);
CUSTOM_BN_CHECK_PARAMS(batch_norm_relu_normalized_input,
                       CUSTOM_BN_BATCH_NORM_RELU_NORMALIZED_INPUT_PARAMS);

#undef CUSTOM_BN_CHECK_PARAMS

}  // namespace custom_bn::detail
