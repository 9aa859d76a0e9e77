// The Autograd kernels of batch_norm_backward and batch_norm_relu_backward, as ATen gives
// native_batch_norm_backward a derivative of its own: the backward always runs the backward
// op's kernels, so first-order gradients are the same with create_graph as without, and when
// its arguments require grad, a node records the formula of its own backward (formulas.h:
// double_backward); forward-mode tangents come from the differentiable formula.
#include "autograd/formulas.h"
#include "autograd/saved_normalization.h"
#include "checks.h"
#include "op_params.h"

#include <ATen/TensorOperators.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <mutex>

namespace custom_bn::autograd {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The backward of one call of a backward op. Gradients in argument order: grad_output, input,
// weight (the fused op's output and the statistics get none).
struct BatchNormDoubleBackward final : torch::autograd::TraceableFunction {
  SavedNormalization normalization;
  SavedVariable grad_output;
  SavedVariable act_output;  // batch_norm_relu_backward's output argument
  Activation act{};
  bool relu = false;

  std::string name() const override {
    return relu ? "BatchNormReluBackwardBackward" : "BatchNormBackwardBackward";
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    normalization.reset_data();
    grad_output.reset_data();
    act_output.reset_data();
  }
  variable_list apply(variable_list&& grads) override;
};

variable_list BatchNormDoubleBackward::apply(variable_list&& grads) {
  std::lock_guard<std::mutex> lock(mutex_);
  const at::Tensor out = act_output.unpack();
  // The fused op's grad_input, grad_weight and grad_bias are batch_norm's of dz, and its
  // grad_residual is dz itself.
  const at::Tensor dz = activation_grad(grad_output.unpack(), out, act);
  const std::array<bool, 3> mask{task_should_compute_output(0), task_should_compute_output(1),
                                 task_should_compute_output(2)};
  const SavedNormalization& n = normalization;
  std::array<at::Tensor, 3> result = double_backward(
      dz, n.input.unpack(), n.weight.unpack(), n.running_mean.unpack(), n.running_var.unpack(),
      n.training, n.eps, grads[0], grads[1], grads[2], mask);
  if (relu && mask[0]) {
    const at::Tensor& gg_residual = grads[3];
    at::Tensor grad_dz = result[0];
    if (gg_residual.defined()) grad_dz = grad_dz.defined() ? grad_dz + gg_residual : gg_residual;
    result[0] = grad_dz.defined() ? activation_grad(grad_dz, out, act) : grad_dz;
  }
  return {result.begin(), result.end()};
}

// The results of a backward op; batch_norm_backward's leave the fourth undefined.
using BackwardResult = std::array<at::Tensor, 4>;

// What the formulas take as constants must not ask for gradients: torch's error, never a
// silent zero (the statistics are recomputed from input; the activation's derivative has
// none).
void check_statistics_ask_no_grad(const char* op, const std::optional<at::Tensor>& running_mean,
                                  const std::optional<at::Tensor>& running_var,
                                  const at::Tensor& save_mean, const at::Tensor& save_invstd) {
  torch::autograd::check_no_requires_grad(running_mean, "running_mean", op);
  torch::autograd::check_no_requires_grad(running_var, "running_var", op);
  torch::autograd::check_no_requires_grad(save_mean, "save_mean", op);
  torch::autograd::check_no_requires_grad(save_invstd, "save_invstd", op);
}

// Runs `below` (the backward op below autograd) with autograd around it. act_output is
// undefined for batch_norm_backward.
template <typename Below>
BackwardResult backward_with_autograd(const char* op, const at::Tensor& grad_output,
                                      const at::Tensor& act_output, const Activation& act,
                                      const at::Tensor& input, CUSTOM_BN_BACKWARD_STATS_PARAMS,
                                      std::array<bool, 3> batch_norm_mask, const Below& below) {
  check_statistics_ask_no_grad(op, running_mean, running_var, save_mean, save_invstd);
  std::shared_ptr<BatchNormDoubleBackward> node;
  if (torch::autograd::compute_requires_grad(grad_output, input, weight)) {
    node.reset(new BatchNormDoubleBackward(), torch::autograd::deleteNode);
    node->set_next_edges(torch::autograd::collect_next_edges(grad_output, input, weight));
  }
  BackwardResult result;
  {
    at::AutoDispatchBelowAutograd below_autograd;
    result = below();
  }
  const NormalizationTensors t(weight, running_mean, running_var, training);
  if (node) {
    // Every result in its place, undefined ones too, so that the node's inputs keep their order.
    const size_t results = act_output.defined() ? 4 : 3;
    torch::autograd::set_history(std::vector<at::Tensor>(result.begin(), result.begin() + results),
                                 node);
    node->normalization.save(input, t, training, eps);
    node->relu = act_output.defined();
    node->act = act;
    node->grad_output = SavedVariable(grad_output, false);
    node->act_output = SavedVariable(act_output, false);
  }
  const auto has_tangent = [](const at::Tensor& t) {
    return t.defined() && t._fw_grad(/*level=*/0).defined();
  };
  if (has_tangent(grad_output) || has_tangent(input) || has_tangent(t.weight) ||
      has_tangent(t.running_mean) || has_tangent(t.running_var)) {
    // The formula run on the dual tensors carries their tangents; its values are discarded.
    at::NoGradGuard tangents_only;
    const at::Tensor dz = activation_grad(grad_output, act_output, act);
    const std::array<at::Tensor, 3> dual = differentiable_backward(
        dz, input, t.weight, t.running_mean, t.running_var, training, eps, batch_norm_mask);
    for (size_t i = 0; i < dual.size(); ++i) {
      if (result[i].defined() && dual[i].defined()) {
        result[i]._set_fw_grad(dual[i]._fw_grad(/*level=*/0), /*level=*/0,
                               /*is_inplace_op=*/false);
      }
    }
    if (result[3].defined()) {
      result[3]._set_fw_grad(dz._fw_grad(/*level=*/0), /*level=*/0, /*is_inplace_op=*/false);
    }
  }
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_autograd(
    CUSTOM_BN_BATCH_NORM_BACKWARD_PARAMS) {
  const BackwardResult r = backward_with_autograd(
      "custom_bn::batch_norm_backward", grad_output, at::Tensor(), Activation{}, input, weight,
      running_mean, running_var, save_mean, save_invstd, training, eps, output_mask,
      [&]() -> BackwardResult {
        const auto [grad_input, grad_weight, grad_bias] =
            batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                                save_invstd, training, eps, output_mask);
        return {grad_input, grad_weight, grad_bias, at::Tensor()};
      });
  return {r[0], r[1], r[2]};
}

// A smooth activation's backward, differentiable: its definition in ATen ops (the
// pre-activation recomputed from input, weight and bias, torch's backward of the activation,
// batch_norm's backward), whose derivatives, reverse and forward, are ATen's. Used only when
// something asks for them; the kernels give the same values to rounding.
BackwardResult differentiable_smooth_backward(const Activation& act,
                                              CUSTOM_BN_BATCH_NORM_RELU_BACKWARD_PARAMS) {
  const NormalizationTensors t(weight, running_mean, running_var, training);
  const at::Tensor z = pre_activation(input, t.weight, bias.value_or(at::Tensor()), t.running_mean,
                                      t.running_var, training, eps);
  const at::Tensor dz = activation_grad_at(grad_output, z, act);
  const std::array<at::Tensor, 3> grads =
      differentiable_backward(dz, input, t.weight, t.running_mean, t.running_var, training, eps,
                              {output_mask[0], output_mask[1], output_mask[2]});
  return {grads[0], grads[1], grads[2], output_mask[3] ? dz : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_autograd(
    CUSTOM_BN_BATCH_NORM_RELU_BACKWARD_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_backward";
  const Activation act = checked_activation(op, CUSTOM_BN_ACTIVATION_ARGS);
  if (act.smooth()) {
    const auto has_tangent = [](const std::optional<at::Tensor>& t) {
      return has(t) && t->_fw_grad(/*level=*/0).defined();
    };
    const bool differentiated =
        torch::autograd::compute_requires_grad(grad_output, input, weight, bias) ||
        has_tangent(grad_output) || has_tangent(input) || has_tangent(weight) ||
        has_tangent(bias) || has_tangent(running_mean) || has_tangent(running_var);
    if (differentiated) {
      check_statistics_ask_no_grad(op, running_mean, running_var, save_mean, save_invstd);
      // Checked as the kernels check, before the formula runs.
      check_batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                                save_invstd, training, op, output, bias);
      const BackwardResult r = differentiable_smooth_backward(
          act, grad_output, output, input, weight, running_mean, running_var, save_mean,
          save_invstd, training, eps, output_mask, CUSTOM_BN_ACTIVATION_ARGS, bias);
      return {r[0], r[1], r[2], r[3]};
    }
  }
  const BackwardResult r = backward_with_autograd(
      op, grad_output, output, act, input, weight, running_mean, running_var, save_mean,
      save_invstd, training, eps, {output_mask[0], output_mask[1], output_mask[2]},
      [&]() -> BackwardResult {
        const auto [grad_input, grad_weight, grad_bias, grad_residual] = batch_norm_relu_backward(
            grad_output, output, input, weight, running_mean, running_var, save_mean, save_invstd,
            training, eps, output_mask, CUSTOM_BN_ACTIVATION_ARGS, bias);
        return {grad_input, grad_weight, grad_bias, grad_residual};
      });
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, Autograd, m) {
  m.impl("batch_norm_backward", TORCH_FN(batch_norm_backward_autograd));
  m.impl("batch_norm_relu_backward", TORCH_FN(batch_norm_relu_backward_autograd));
}

}  // namespace custom_bn::autograd
