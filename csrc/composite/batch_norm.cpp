// batch_norm and batch_norm_relu, for every backend and for autograd at once: the outputs of
// batch_norm_forward and batch_norm_relu_forward, or in evaluation mode of the non-mutating
// batch_norm_eval, whose Autograd kernels (csrc/autograd/) make them differentiable. Being
// compositions, they are differentiable at every level of a torch.func transform through
// those kernels, and torch.export sees no state written by an eval graph.
#include "activation.h"
#include "checks.h"
#include "op_params.h"

#include <ATen/TensorOperators.h>
#include <torch/library.h>

#include <cmath>

namespace custom_bn {
namespace {

// Evaluation with running statistics writes nothing: num_batches_tracked is only checked.
bool reads_running_stats_only(const char* op, const at::Tensor& input, bool training,
                              const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var,
                              const std::optional<at::Tensor>& num_batches_tracked,
                              std::optional<double> momentum) {
  if (training || !has(running_mean) || !has(running_var)) return false;
  check_running_update(op, input, num_batches_tracked, momentum, /*updates_running_stats=*/false);
  return true;
}

// torch returns an empty batch early, before its dtype checks: a float64 batch of 0 goes
// through a float32 module, where a non-empty one is refused. For that dtype mix alone (every
// other empty batch takes the kernels' path), the result is torch's: the input's dtype and
// strides, differentiable (zero gradients), the running stats untouched and
// num_batches_tracked counting the call.
bool is_empty_batch_of_another_dtype(const at::Tensor& input,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& running_mean,
                                     const std::optional<at::Tensor>& running_var) {
  return input.sym_numel() == 0 &&
         !params_fit_input_dtype(input, weight, bias, running_mean, running_var);
}

at::Tensor empty_batch_output(const char* op, const at::Tensor& input,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var,
                              const std::optional<at::Tensor>& num_batches_tracked, bool training,
                              std::optional<double> momentum, const std::optional<Activation>& act,
                              const std::optional<at::Tensor>& residual) {
  check_input(op, input);
  check_running_update(op, input, num_batches_tracked, momentum,
                       training && has(running_mean) && has(running_var));
  if (training && has(running_mean) && has(num_batches_tracked)) num_batches_tracked->add_(1);
  // As torch: the input's clone, scaled and shifted by a channel's parameters (a 0-dim operand
  // keeps the input's dtype), so that weight and bias get (zero) gradients.
  at::Tensor output = input.clone();
  if (input.sym_size(1) > 0) {
    if (has(weight)) output = output * weight->select(0, 0);
    if (has(bias)) output = output + bias->select(0, 0);
  }
  if (has(residual)) output = output + *residual;
  return act ? activated(output, *act) : output;
}

at::Tensor batch_norm_composite(CUSTOM_BN_BATCH_NORM_PARAMS) {
  if (is_empty_batch_of_another_dtype(input, weight, bias, running_mean, running_var)) {
    return empty_batch_output("custom_bn::batch_norm", input, weight, bias, running_mean,
                              running_var, num_batches_tracked, training, momentum, std::nullopt,
                              std::nullopt);
  }
  if (reads_running_stats_only("custom_bn::batch_norm", input, training, running_mean, running_var,
                               num_batches_tracked, momentum)) {
    return batch_norm_eval(input, weight, bias, *running_mean, *running_var, eps, /*relu=*/false,
                           std::nullopt, 0.0, std::nullopt, 0.0, "piecewise_linear");
  }
  return std::get<0>(batch_norm_forward(input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, training, momentum, eps));
}

at::Tensor batch_norm_relu_composite(CUSTOM_BN_BATCH_NORM_RELU_PARAMS) {
  if (is_empty_batch_of_another_dtype(input, weight, bias, running_mean, running_var)) {
    const char* op = "custom_bn::batch_norm_relu";
    return empty_batch_output(op, input, weight, bias, running_mean, running_var,
                              num_batches_tracked, training, momentum,
                              checked_activation(op, CUSTOM_BN_ACTIVATION_ARGS), residual);
  }
  if (reads_running_stats_only("custom_bn::batch_norm_relu", input, training, running_mean,
                               running_var, num_batches_tracked, momentum)) {
    return batch_norm_eval(input, weight, bias, *running_mean, *running_var, eps, /*relu=*/true,
                           residual, CUSTOM_BN_ACTIVATION_ARGS);
  }
  return std::get<0>(batch_norm_relu_forward(input, weight, bias, running_mean, running_var,
                                             num_batches_tracked, residual, training, momentum, eps,
                                             CUSTOM_BN_ACTIVATION_ARGS));
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, CompositeImplicitAutograd, m) {
  m.impl("batch_norm", TORCH_FN(batch_norm_composite));
  m.impl("batch_norm_relu", TORCH_FN(batch_norm_relu_composite));
}

}  // namespace custom_bn
