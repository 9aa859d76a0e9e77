// Meta kernels: the same checks as the real kernels, then outputs of the right shape, dtype
// and strides, with symbolic sizes so torch.compile can trace with dynamic shapes.
#include "backends.h"
#include "checks.h"
#include "inplace.h"
#include "layout.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace custom_bn::meta {
namespace {

at::Tensor empty_stat(const at::Tensor& like, const c10::SymInt& size, at::ScalarType dtype) {
  return at::empty_symint({size}, like.options().dtype(dtype));
}

at::Tensor empty_output(const at::Tensor& input) {
  return empty_result_like(input, ResultKind::kOutput);
}

at::Tensor empty_gradient(const at::Tensor& input) {
  return empty_result_like(input, ResultKind::kGradient);
}

at::Tensor empty_channel_stat(const at::Tensor& input) {
  return empty_stat(input, input.sym_size(1), stat_dtype(input.scalar_type()));
}

at::Tensor empty_param_grad(const at::Tensor& input, const std::optional<at::Tensor>& weight) {
  return empty_stat(input, input.sym_size(1),
                    has(weight) ? weight->scalar_type() : input.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    CUSTOM_BN_BATCH_NORM_FORWARD_PARAMS) {
  check_batch_norm_forward("custom_bn::batch_norm_forward", input, weight, bias, running_mean,
                           running_var, num_batches_tracked, training, momentum);
  if (!training) {
    const at::ScalarType dtype = stat_dtype(input.scalar_type());
    return {empty_output(input), empty_stat(input, 0, dtype), empty_stat(input, 0, dtype)};
  }
  return {empty_output(input), empty_channel_stat(input), empty_channel_stat(input)};
}

at::Tensor batch_norm_eval(CUSTOM_BN_BATCH_NORM_EVAL_PARAMS) {
  const char* op = "custom_bn::batch_norm_eval";
  check_activation_residual(op, checked_activation(op, CUSTOM_BN_ACTIVATION_ARGS), has(residual));
  check_batch_norm_eval(op, input, weight, bias, running_mean, running_var, relu, residual);
  return empty_output(input);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    CUSTOM_BN_BATCH_NORM_BACKWARD_PARAMS) {
  check_batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                            save_invstd, training);
  return {output_mask[0] ? empty_gradient(input) : at::Tensor(),
          output_mask[1] ? empty_param_grad(input, weight) : at::Tensor(),
          output_mask[2] ? empty_param_grad(input, weight) : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_forward(
    CUSTOM_BN_BATCH_NORM_RELU_FORWARD_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_forward";
  check_activation_residual(op, checked_activation(op, CUSTOM_BN_ACTIVATION_ARGS), has(residual));
  check_batch_norm_forward(op, input, weight, bias, running_mean, running_var, num_batches_tracked,
                           training, momentum, residual);
  const at::ScalarType dtype = stat_dtype(input.scalar_type());
  const c10::SymInt stat_size = training ? input.sym_size(1) : c10::SymInt(0);
  return {empty_output(input), empty_stat(input, stat_size, dtype),
          empty_stat(input, stat_size, dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward(
    CUSTOM_BN_BATCH_NORM_RELU_BACKWARD_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_backward";
  checked_activation(op, CUSTOM_BN_ACTIVATION_ARGS);
  check_batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                            save_invstd, training, op, output, bias);
  return {output_mask[0] ? empty_gradient(input) : at::Tensor(),
          output_mask[1] ? empty_param_grad(input, weight) : at::Tensor(),
          output_mask[2] ? empty_param_grad(input, weight) : at::Tensor(),
          output_mask[3] ? empty_gradient(input) : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_stats(CUSTOM_BN_BATCH_NORM_STATS_PARAMS) {
  check_input("custom_bn::batch_norm_stats", input);
  return {empty_stat(input, 1, stat_dtype(input.scalar_type())), empty_channel_stat(input),
          empty_channel_stat(input)};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_gather_stats_with_counts(
    CUSTOM_BN_BATCH_NORM_GATHER_STATS_WITH_COUNTS_PARAMS) {
  check_gather_stats(mean, m2, counts, running_mean, running_var, num_batches_tracked, momentum);
  return {empty_stat(mean, mean.sym_size(1), mean.scalar_type()),
          empty_stat(mean, mean.sym_size(1), mean.scalar_type())};
}

at::Tensor batch_norm_elemt(CUSTOM_BN_BATCH_NORM_ELEMT_PARAMS) {
  check_elemt("custom_bn::batch_norm_elemt", input, weight, bias, mean, invstd);
  return empty_output(input);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce(
    CUSTOM_BN_BATCH_NORM_BACKWARD_REDUCE_PARAMS) {
  const char* op = "custom_bn::batch_norm_backward_reduce";
  check_elemt(op, input, weight, std::nullopt, mean, invstd);
  check_grad_output(op, grad_output, input);
  return {input_g ? empty_channel_stat(input) : at::Tensor(),
          input_g ? empty_channel_stat(input) : at::Tensor(),
          weight_g ? empty_param_grad(input, weight) : at::Tensor(),
          bias_g ? empty_param_grad(input, weight) : at::Tensor()};
}

at::Tensor batch_norm_backward_elemt(CUSTOM_BN_BATCH_NORM_BACKWARD_ELEMT_PARAMS) {
  check_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count);
  return empty_gradient(input);
}

// The number of kept input values depends on the data, which meta tensors do not have: with
// keep_input this kernel refuses, as ATen's nonzero does on meta. FakeTensors (torch.compile,
// torch.export) give it a size of its own through the Python package's fake kernel, which
// `import custom_bn` registers over this one (integrations/fake.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_forward_(
    CUSTOM_BN_BATCH_NORM_RELU_FORWARD_INPLACE_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_forward_";
  checked_inplace_activation(op, CUSTOM_BN_INPLACE_ACTIVATION_ARGS);
  check_batch_norm_relu_forward_inplace(op, input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, residual, training, momentum);
  TORCH_CHECK_NOT_IMPLEMENTED(!keep_input, op,
                              ": with keep_input, the size of kept_input depends on the data, "
                              "which meta tensors do not have (FakeTensors can give it one: "
                              "import custom_bn)");
  const at::ScalarType dtype = stat_dtype(input.scalar_type());
  const c10::SymInt stat_size = training ? input.sym_size(1) : c10::SymInt(0);
  return {empty_stat(input, stat_size, dtype), empty_stat(input, stat_size, dtype),
          at::empty({0}, input.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_inplace_backward(
    CUSTOM_BN_BATCH_NORM_RELU_INPLACE_BACKWARD_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_inplace_backward";
  checked_inplace_activation(op, CUSTOM_BN_INPLACE_ACTIVATION_ARGS);
  check_batch_norm_relu_inplace_backward(op, grad_output, output, kept_input, weight, bias,
                                         residual, running_mean, running_var, save_mean,
                                         save_invstd, training);
  return {output_mask[0] ? empty_gradient(output) : at::Tensor(),
          output_mask[1] && has(weight) ? empty_param_grad(output, weight) : at::Tensor(),
          output_mask[2] ? empty_param_grad(output, weight) : at::Tensor(),
          output_mask[3] ? empty_gradient(output) : at::Tensor()};
}

at::Tensor batch_norm_relu_normalized_input(CUSTOM_BN_BATCH_NORM_RELU_NORMALIZED_INPUT_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_normalized_input";
  checked_inplace_activation(op, CUSTOM_BN_INPLACE_ACTIVATION_ARGS);
  check_batch_norm_relu_normalized_input(op, output, kept_input, weight, bias, residual, mean,
                                         invstd);
  return at::empty_like(output, output.options().dtype(stat_dtype(output.scalar_type())));
}

TORCH_LIBRARY_IMPL(custom_bn, Meta, m) {
  CUSTOM_BN_REGISTER_BACKEND_OPS(m);
  m.impl("batch_norm_relu_forward_", TORCH_FN(meta::batch_norm_relu_forward_));
  m.impl("batch_norm_relu_inplace_backward", TORCH_FN(meta::batch_norm_relu_inplace_backward));
  m.impl("batch_norm_relu_normalized_input", TORCH_FN(meta::batch_norm_relu_normalized_input));
}

}  // namespace custom_bn::meta
