// Autograd for in-place activated batch norm, built as ATen builds its in-place ops' kernels:
// torch's in-place checks first (a leaf that requires grad, a view that cannot be written),
// the forward below autograd (ADInplaceOrView bumps the input's version, so anything that saved
// the old value fails with torch's error at its backward), then the input's history rebased
// onto this node, which keeps the output (the input now, saved as an output), the residual,
// and the input values the output cannot give back.
//
// Its backward is not differentiable again: where the activation clipped, x_hat comes from
// kept values that are constants of the graph, so a derivative through the recovery would be
// wrong; create_graph through it is refused (the out-of-place batch_norm_relu has one).
#include "inplace.h"
#include "checks.h"
#include "op_params.h"

#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <mutex>

namespace custom_bn::autograd {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) {
  return has(t) ? *t : at::Tensor();
}

std::optional<at::Tensor> optional(const SavedVariable& saved) {
  at::Tensor t = saved.unpack();
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Gradients for (input, weight, bias, residual).
struct BatchNormReluInplaceBackward final : torch::autograd::TraceableFunction {
  SavedVariable output, kept_input, weight, bias, residual, running_mean, running_var;
  SavedVariable save_mean, save_invstd;
  bool training = false;
  double eps = 0;
  Activation act{};

  std::string name() const override { return "BatchNormReluInplaceBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : {&output, &kept_input, &weight, &bias, &residual, &running_mean,
                                 &running_var, &save_mean, &save_invstd}) {
      saved->reset_data();
    }
  }
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list result(4);
    if (!grads[0].defined()) return result;
    const std::array<bool, 4> mask{task_should_compute_output(0), task_should_compute_output(1),
                                   task_should_compute_output(2), task_should_compute_output(3)};
    std::tie(result[0], result[1], result[2], result[3]) = batch_norm_relu_inplace_backward(
        grads[0], output.unpack(shared_from_this()), kept_input.unpack(), optional(weight),
        optional(bias), optional(residual), optional(running_mean), optional(running_var),
        save_mean.unpack(), save_invstd.unpack(), training, eps, mask, act.lower, upper_bound(act),
        act.slope);
    return result;
  }
};

bool has_tangent(const std::optional<at::Tensor>& t) {
  return has(t) && t->_fw_grad(/*level=*/0).defined();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_forward_inplace_autograd(
    CUSTOM_BN_BATCH_NORM_RELU_FORWARD_INPLACE_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_forward_";
  const Activation act = checked_inplace_activation(op, CUSTOM_BN_INPLACE_ACTIVATION_ARGS);
  torch::autograd::check_no_requires_grad(running_mean, "running_mean", op);
  torch::autograd::check_no_requires_grad(running_var, "running_var", op);
  TORCH_CHECK_NOT_IMPLEMENTED(
      !input._fw_grad(/*level=*/0).defined() && !has_tangent(weight) && !has_tangent(bias) &&
          !has_tangent(residual),
      op,
      ": forward-mode AD of in-place activated batch norm is not implemented; "
      "batch_norm_relu, the out-of-place op, has it");
  const bool requires_grad = torch::autograd::compute_requires_grad(input, weight, bias, residual);
  torch::autograd::check_inplace(input, requires_grad);
  TORCH_CHECK(keep_input || !requires_grad, op,
              ": keep_input=False keeps nothing for the backward, but the output requires grad");
  std::shared_ptr<BatchNormReluInplaceBackward> node;
  if (requires_grad) {
    node.reset(new BatchNormReluInplaceBackward(), torch::autograd::deleteNode);
    node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias, residual));
  }
  // Activation checkpointing runs the forward again in the backward pass: the running stats
  // count the batch once (as batch_norm_relu's Autograd kernel does).
  const bool recomputed = training && torch::autograd::get_current_graph_task_id() != -1;
  const std::optional<at::Tensor> none;
  at::Tensor save_mean, save_invstd, kept_input;
  {
    // Below Autograd, above ADInplaceOrView, which bumps the versions of what is written.
    at::AutoDispatchBelowAutograd below_autograd;
    std::tie(save_mean, save_invstd, kept_input) = batch_norm_relu_forward_(
        input, weight, bias, recomputed ? none : running_mean, recomputed ? none : running_var,
        recomputed ? none : num_batches_tracked, residual, training, momentum, eps,
        CUSTOM_BN_INPLACE_ACTIVATION_ARGS, keep_input);
  }
  if (node) {
    torch::autograd::rebase_history(input, node);
    node->output = SavedVariable(input, /*is_output=*/true, input.is_view());
    node->kept_input = SavedVariable(kept_input, false);
    node->weight = SavedVariable(value_or_undefined(weight), false);
    node->bias = SavedVariable(value_or_undefined(bias), false);
    node->residual = SavedVariable(value_or_undefined(residual), false);
    if (!training) {
      node->running_mean = SavedVariable(value_or_undefined(running_mean), false);
      node->running_var = SavedVariable(value_or_undefined(running_var), false);
    }
    node->save_mean = SavedVariable(save_mean, false);
    node->save_invstd = SavedVariable(save_invstd, false);
    node->training = training;
    node->eps = eps;
    node->act = act;
  }
  return {save_mean, save_invstd, kept_input};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
batch_norm_relu_inplace_backward_autograd(CUSTOM_BN_BATCH_NORM_RELU_INPLACE_BACKWARD_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_inplace_backward";
  TORCH_CHECK_NOT_IMPLEMENTED(
      !torch::autograd::compute_requires_grad(grad_output, output, kept_input, weight, bias,
                                              residual, running_mean, running_var, save_mean,
                                              save_invstd),
      op,
      ": the backward of in-place activated batch norm is not differentiable (double "
      "backward, create_graph=True); batch_norm_relu, the out-of-place op, is");
  at::AutoDispatchBelowADInplaceOrView below;
  return batch_norm_relu_inplace_backward(
      grad_output, output, kept_input, weight, bias, residual, running_mean, running_var, save_mean,
      save_invstd, training, eps, output_mask, CUSTOM_BN_INPLACE_ACTIVATION_ARGS);
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, Autograd, m) {
  m.impl("batch_norm_relu_forward_", TORCH_FN(batch_norm_relu_forward_inplace_autograd));
  m.impl("batch_norm_relu_inplace_backward", TORCH_FN(batch_norm_relu_inplace_backward_autograd));
}

}  // namespace custom_bn::autograd
