// The C++ API: each function finds its schema once and calls through the dispatcher.
#include "op_params.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace custom_bn {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

#define CUSTOM_BN_OP_HANDLE(op) \
  static const auto handle = find_op<decltype(::custom_bn::op)>("custom_bn::" #op)

at::Tensor batch_norm(CUSTOM_BN_BATCH_NORM_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm);
  return handle.call(input, weight, bias, running_mean, running_var, training, momentum, eps,
                     num_batches_tracked);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    CUSTOM_BN_BATCH_NORM_FORWARD_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_forward);
  return handle.call(input, weight, bias, running_mean, running_var, num_batches_tracked, training,
                     momentum, eps);
}

at::Tensor batch_norm_eval(CUSTOM_BN_BATCH_NORM_EVAL_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_eval);
  return handle.call(input, weight, bias, running_mean, running_var, eps, relu, residual,
                     CUSTOM_BN_ACTIVATION_ARGS);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    CUSTOM_BN_BATCH_NORM_BACKWARD_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_backward);
  return handle.call(grad_output, input, weight, running_mean, running_var, save_mean, save_invstd,
                     training, eps, output_mask);
}

at::Tensor batch_norm_relu(CUSTOM_BN_BATCH_NORM_RELU_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_relu);
  return handle.call(input, weight, bias, running_mean, running_var, training, momentum, eps,
                     num_batches_tracked, residual, CUSTOM_BN_ACTIVATION_ARGS);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_forward(
    CUSTOM_BN_BATCH_NORM_RELU_FORWARD_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_relu_forward);
  return handle.call(input, weight, bias, running_mean, running_var, num_batches_tracked, residual,
                     training, momentum, eps, CUSTOM_BN_ACTIVATION_ARGS);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward(
    CUSTOM_BN_BATCH_NORM_RELU_BACKWARD_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_relu_backward);
  return handle.call(grad_output, output, input, weight, running_mean, running_var, save_mean,
                     save_invstd, training, eps, output_mask, CUSTOM_BN_ACTIVATION_ARGS, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_stats(CUSTOM_BN_BATCH_NORM_STATS_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_stats);
  return handle.call(input);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_gather_stats_with_counts(
    CUSTOM_BN_BATCH_NORM_GATHER_STATS_WITH_COUNTS_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_gather_stats_with_counts);
  return handle.call(mean, m2, counts, running_mean, running_var, num_batches_tracked, momentum,
                     eps);
}

at::Tensor batch_norm_elemt(CUSTOM_BN_BATCH_NORM_ELEMT_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_elemt);
  return handle.call(input, weight, bias, mean, invstd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce(
    CUSTOM_BN_BATCH_NORM_BACKWARD_REDUCE_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_backward_reduce);
  return handle.call(grad_output, input, mean, invstd, weight, input_g, weight_g, bias_g);
}

at::Tensor batch_norm_backward_elemt(CUSTOM_BN_BATCH_NORM_BACKWARD_ELEMT_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_backward_elemt);
  return handle.call(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count);
}

at::Tensor& batch_norm_relu_(CUSTOM_BN_BATCH_NORM_RELU_INPLACE_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_relu_);
  return handle.call(input, weight, bias, running_mean, running_var, training, momentum, eps,
                     num_batches_tracked, residual, CUSTOM_BN_INPLACE_ACTIVATION_ARGS);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_forward_(
    CUSTOM_BN_BATCH_NORM_RELU_FORWARD_INPLACE_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_relu_forward_);
  return handle.call(input, weight, bias, running_mean, running_var, num_batches_tracked, residual,
                     training, momentum, eps, CUSTOM_BN_INPLACE_ACTIVATION_ARGS, keep_input);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_inplace_backward(
    CUSTOM_BN_BATCH_NORM_RELU_INPLACE_BACKWARD_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_relu_inplace_backward);
  return handle.call(grad_output, output, kept_input, weight, bias, residual, running_mean,
                     running_var, save_mean, save_invstd, training, eps, output_mask,
                     CUSTOM_BN_INPLACE_ACTIVATION_ARGS);
}

at::Tensor batch_norm_relu_normalized_input(CUSTOM_BN_BATCH_NORM_RELU_NORMALIZED_INPUT_PARAMS) {
  CUSTOM_BN_OP_HANDLE(batch_norm_relu_normalized_input);
  return handle.call(output, kept_input, weight, bias, residual, mean, invstd,
                     CUSTOM_BN_INPLACE_ACTIVATION_ARGS);
}

#undef CUSTOM_BN_OP_HANDLE

}  // namespace custom_bn
