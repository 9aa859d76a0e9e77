// In-place activated batch norm for every backend at once, in the backends' own ops: the
// forward is batch_norm_relu_forward's output copied over the input, after the input values
// its backward cannot recover were taken out (csrc/inplace.h); the backward recovers x_hat and
// runs batch_norm_relu_backward on it. batch_norm_relu_ itself is their composition, whose
// Autograd kernel is the forward stage op's (csrc/autograd/inplace.cpp).
#include "inplace.h"
#include "channel_stats.h"
#include "checks.h"
#include "op_params.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

namespace custom_bn {
namespace {

bool requires_grad(const std::optional<at::Tensor>& t) { return has(t) && t->requires_grad(); }

at::Tensor& batch_norm_relu_inplace_composite(CUSTOM_BN_BATCH_NORM_RELU_INPLACE_PARAMS) {
  // Nothing to keep for a backward that cannot come.
  const bool keep_input =
      at::GradMode::is_enabled() && (input.requires_grad() || requires_grad(weight) ||
                                     requires_grad(bias) || requires_grad(residual));
  batch_norm_relu_forward_(input, weight, bias, running_mean, running_var, num_batches_tracked,
                           residual, training, momentum, eps, CUSTOM_BN_INPLACE_ACTIVATION_ARGS,
                           keep_input);
  return input;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_forward_inplace_kernel(
    CUSTOM_BN_BATCH_NORM_RELU_FORWARD_INPLACE_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_forward_";
  const Activation act = checked_inplace_activation(op, CUSTOM_BN_INPLACE_ACTIVATION_ARGS);
  check_batch_norm_relu_forward_inplace(op, input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, residual, training, momentum);
  const auto [output, save_mean, save_invstd] = batch_norm_relu_forward(
      input, weight, bias, running_mean, running_var, num_batches_tracked, residual, training,
      momentum, eps, CUSTOM_BN_INPLACE_ACTIVATION_ARGS, "piecewise_linear");
  const at::Tensor kept_input =
      keep_input ? input.masked_select(kept_positions(output, weight, bias, residual, act))
                 : at::empty({0}, input.options());
  input.copy_(output);
  return {save_mean, save_invstd, kept_input};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_inplace_backward_kernel(
    CUSTOM_BN_BATCH_NORM_RELU_INPLACE_BACKWARD_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_inplace_backward";
  const Activation act = checked_inplace_activation(op, CUSTOM_BN_INPLACE_ACTIVATION_ARGS);
  check_batch_norm_relu_inplace_backward(op, grad_output, output, kept_input, weight, bias,
                                         residual, running_mean, running_var, save_mean,
                                         save_invstd, training);
  const at::ScalarType dtype = stat_dtype(output.scalar_type());
  const at::Tensor mean = training ? save_mean : running_mean->to(dtype);
  const at::Tensor invstd = training ? save_invstd : (running_var->to(dtype) + eps).rsqrt();
  const at::Tensor kept = kept_positions(output, weight, bias, residual, act);
  const at::Tensor x_hat =
      normalized_input(output, kept_input, kept, weight, bias, residual, mean, invstd, act);
  // x_hat is batch_norm_relu_backward's input normalized by mean 0 and invstd 1, with the
  // weight scaled by invstd: the same gradients, computed in the statistics dtype.
  const at::Tensor scale = has(weight) ? weight->to(dtype) * invstd : invstd;
  const at::Tensor zeros = at::zeros_like(invstd), ones = at::ones_like(invstd);
  const auto none = std::nullopt;
  const auto [grad_input, grad_scale, grad_bias, grad_residual] =
      training
          ? batch_norm_relu_backward(grad_output.to(dtype), output.to(dtype), x_hat, scale, none,
                                     none, zeros, ones, /*training=*/true, eps, output_mask,
                                     CUSTOM_BN_INPLACE_ACTIVATION_ARGS, "piecewise_linear", none)
          : batch_norm_relu_backward(grad_output.to(dtype), output.to(dtype), x_hat, scale, zeros,
                                     ones, at::empty({0}, invstd.options()),
                                     at::empty({0}, invstd.options()),
                                     /*training=*/false, /*eps=*/0.0, output_mask,
                                     CUSTOM_BN_INPLACE_ACTIVATION_ARGS, "piecewise_linear", none);
  // grad_weight = sum(dz * x_hat) whatever the weight; the gradients in the forward's dtypes.
  const at::ScalarType param_dtype = has(weight) ? weight->scalar_type() : output.scalar_type();
  const auto in = [](const at::Tensor& t, at::ScalarType type) {
    return t.defined() ? t.to(type) : t;
  };
  return {in(grad_input, output.scalar_type()),
          has(weight) ? in(grad_scale, param_dtype) : at::Tensor(), in(grad_bias, param_dtype),
          in(grad_residual, output.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_relu_", TORCH_FN(batch_norm_relu_inplace_composite));
}

TORCH_LIBRARY_IMPL(custom_bn, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_relu_forward_", TORCH_FN(batch_norm_relu_forward_inplace_kernel));
  m.impl("batch_norm_relu_inplace_backward", TORCH_FN(batch_norm_relu_inplace_backward_kernel));
}

}  // namespace custom_bn
