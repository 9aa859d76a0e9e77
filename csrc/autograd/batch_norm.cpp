// The Autograd kernels of batch_norm_forward and batch_norm_relu_forward (batch_norm and
// batch_norm_relu are compositions of them), built as ATen builds its own (its generated
// VariableType kernels): the forward runs below autograd, a Node records what the backward
// reads, and forward-mode tangents come from formulas.h. torch.func's transforms (grad, vjp,
// jacrev, jvp, jacfwd, and their compositions) accept such kernels at every level; they
// refuse C++ torch::autograd::Function.
//
// The backward runs the batch_norm(_relu)_backward op, whose own Autograd kernel
// (backward.cpp) makes it differentiable where it must be (create_graph, torch.func).
#include "autograd/formulas.h"
#include "autograd/saved_normalization.h"
#include "channel_stats.h"
#include "checks.h"
#include "op_params.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <mutex>
#include <optional>

namespace custom_bn::autograd {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The backward of one call. Gradients in argument order: input, weight, bias and, for
// batch_norm_relu, residual.
struct BatchNormBackward final : torch::autograd::TraceableFunction {
  SavedNormalization normalization;
  SavedVariable save_mean, save_invstd;
  SavedVariable output;  // batch_norm_relu's output: it tells the activation's gradient
  SavedVariable bias;    // with a smooth activation, for the pre-activation the backward recomputes
  Activation act{};
  bool relu = false;

  std::string name() const override { return relu ? "BatchNormReluBackward" : "BatchNormBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    normalization.reset_data();
    for (SavedVariable* saved : {&save_mean, &save_invstd, &output, &bias}) saved->reset_data();
  }
  variable_list apply(variable_list&& grads) override;
};

variable_list BatchNormBackward::apply(variable_list&& grads) {
  std::lock_guard<std::mutex> lock(mutex_);
  const at::Tensor& grad_output = grads[0];
  variable_list result(relu ? 4 : 3);
  if (!grad_output.defined()) return result;
  const SavedNormalization& n = normalization;
  const at::Tensor x = n.input.unpack(), w = n.weight.unpack();
  const at::Tensor mean = n.running_mean.unpack(), var = n.running_var.unpack();
  const at::Tensor out = relu ? output.unpack(shared_from_this()) : at::Tensor();
  const std::array<bool, 3> mask{task_should_compute_output(0), task_should_compute_output(1),
                                 task_should_compute_output(2)};
  const bool residual_grad = relu && task_should_compute_output(3);
  if (relu) {
    const at::Tensor b = bias.unpack();
    std::tie(result[0], result[1], result[2], result[3]) = batch_norm_relu_backward(
        grad_output, out, x, w, mean, var, save_mean.unpack(), save_invstd.unpack(), n.training,
        n.eps, {mask[0], mask[1], mask[2], residual_grad}, act.lower, upper_bound(act), act.slope,
        activation_name(act), b.defined() ? std::optional<at::Tensor>(b) : std::nullopt);
  } else {
    std::tie(result[0], result[1], result[2]) =
        batch_norm_backward(grad_output, x, w, mean, var, save_mean.unpack(), save_invstd.unpack(),
                            n.training, n.eps, mask);
  }
  return result;
}

at::Tensor tangent_of(const std::optional<at::Tensor>& t) {
  return has(t) ? t->_fw_grad(/*level=*/0) : at::Tensor();
}

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Which op runs below autograd.
enum class ForwardOp { kForward, kEval };

// batch_norm_forward (relu = false), batch_norm_relu_forward or (ForwardOp::kEval, training =
// false) batch_norm_eval with autograd: the output is differentiable, save_mean and
// save_invstd are not.
ForwardResult forward_with_autograd(ForwardOp forward_op, bool relu,
                                    CUSTOM_BN_BATCH_NORM_RELU_FORWARD_PARAMS) {
  // Evaluation normalizes with the running stats, which are not differentiable: a tangent on
  // them is refused with torch's error (torch's jvp formula checks it), never dropped. Unlike
  // torch, also when no other argument carries a tangent.
  // Nor do they get gradients: requires_grad on them is refused, with torch's message (its
  // check_no_requires_grad, as native_batch_norm's autograd kernel calls it), never ignored.
  const char* op = forward_op == ForwardOp::kEval ? "custom_bn::batch_norm_eval"
                   : relu                         ? "custom_bn::batch_norm_relu_forward"
                                                  : "custom_bn::batch_norm_forward";
  const Activation act = checked_activation(op, CUSTOM_BN_ACTIVATION_ARGS);
  torch::autograd::check_no_requires_grad(running_mean, "running_mean", op);
  torch::autograd::check_no_requires_grad(running_var, "running_var", op);
  TORCH_CHECK(
      training || (!tangent_of(running_mean).defined() && !tangent_of(running_var).defined()),
      "batch_norm is not differentiable wrt running_mean and running_var, they cannot "
      "have forward grad defined");
  std::shared_ptr<BatchNormBackward> node;
  if (torch::autograd::compute_requires_grad(input, weight, bias, residual)) {
    node.reset(new BatchNormBackward(), torch::autograd::deleteNode);
    node->set_next_edges(relu ? torch::autograd::collect_next_edges(input, weight, bias, residual)
                              : torch::autograd::collect_next_edges(input, weight, bias));
  }
  // A training forward run again during the backward pass (activation checkpointing
  // recomputes it there) normalizes with the same batch statistics, but must not count the
  // batch a second time in the running stats (torch does: pytorch issue 96136).
  const bool recomputed = training && torch::autograd::get_current_graph_task_id() != -1;
  const std::optional<at::Tensor> no_tensor;
  const auto& updated_mean = recomputed ? no_tensor : running_mean;
  const auto& updated_var = recomputed ? no_tensor : running_var;
  const auto& counter = recomputed ? no_tensor : num_batches_tracked;
  at::Tensor output, save_mean, save_invstd;
  {
    // Below Autograd but above ADInplaceOrView, which bumps the running stats' versions.
    at::AutoDispatchBelowAutograd below_autograd;
    if (forward_op == ForwardOp::kEval) {
      output = batch_norm_eval(input, weight, bias, *running_mean, *running_var, eps, relu,
                               residual, CUSTOM_BN_ACTIVATION_ARGS);
      // Eval's backward reads the running stats; the node only wants defined save_*.
      if (node) save_mean = save_invstd = at::empty({0}, stat_options(input));
    } else {
      std::tie(output, save_mean, save_invstd) =
          relu ? batch_norm_relu_forward(input, weight, bias, updated_mean, updated_var, counter,
                                         residual, training, momentum, eps,
                                         CUSTOM_BN_ACTIVATION_ARGS)
               : batch_norm_forward(input, weight, bias, updated_mean, updated_var, counter,
                                    training, momentum, eps);
    }
  }
  // Eval normalizes with the running stats; training needs only save_* (and mutates them).
  const NormalizationTensors t(weight, running_mean, running_var, training);
  if (node) {
    torch::autograd::set_history(output, node);
    node->normalization.save(input, t, training, eps);
    node->relu = relu;
    node->act = act;
    node->save_mean = SavedVariable(save_mean, false);
    node->save_invstd = SavedVariable(save_invstd, false);
    if (relu) node->output = SavedVariable(output, true);
    if (act.smooth() && has(bias)) node->bias = SavedVariable(*bias, false);
  }
  const at::Tensor input_tangent = input._fw_grad(/*level=*/0);
  const at::Tensor residual_tangent = tangent_of(residual);
  if (input_tangent.defined() || tangent_of(weight).defined() || tangent_of(bias).defined() ||
      residual_tangent.defined()) {
    // From the primals: a tangent must not carry a tangent of its own at the same level.
    const auto primal = [](const at::Tensor& t) {
      return t.defined() ? t._fw_primal(/*level=*/0) : t;
    };
    at::Tensor tangent = forward_tangent(primal(input), primal(t.weight), primal(t.running_mean),
                                         primal(t.running_var), training, eps, input_tangent,
                                         tangent_of(weight), tangent_of(bias));
    if (relu && act.smooth()) {  // never with a residual
      tangent = activation_grad_at(
          tangent,
          pre_activation(primal(input), primal(t.weight), primal(bias.value_or(at::Tensor())),
                         primal(t.running_mean), primal(t.running_var), training, eps),
          act);
    } else if (relu) {
      if (residual_tangent.defined()) tangent = tangent + residual_tangent;
      tangent = activation_grad(tangent, primal(output), act);
    }
    output._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
  }
  return {output, save_mean, save_invstd};
}

ForwardResult batch_norm_forward_autograd(CUSTOM_BN_BATCH_NORM_FORWARD_PARAMS) {
  return forward_with_autograd(ForwardOp::kForward, /*relu=*/false, input, weight, bias,
                               running_mean, running_var, num_batches_tracked, std::nullopt,
                               training, momentum, eps, 0.0, std::nullopt, 0.0, "piecewise_linear");
}

ForwardResult batch_norm_relu_forward_autograd(CUSTOM_BN_BATCH_NORM_RELU_FORWARD_PARAMS) {
  return forward_with_autograd(ForwardOp::kForward, /*relu=*/true, input, weight, bias,
                               running_mean, running_var, num_batches_tracked, residual, training,
                               momentum, eps, CUSTOM_BN_ACTIVATION_ARGS);
}

at::Tensor batch_norm_eval_autograd(CUSTOM_BN_BATCH_NORM_EVAL_PARAMS) {
  return std::get<0>(forward_with_autograd(ForwardOp::kEval, relu, input, weight, bias,
                                           running_mean, running_var, std::nullopt, residual,
                                           /*training=*/false, std::nullopt, eps,
                                           CUSTOM_BN_ACTIVATION_ARGS));
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, Autograd, m) {
  m.impl("batch_norm_forward", TORCH_FN(batch_norm_forward_autograd));
  m.impl("batch_norm_relu_forward", TORCH_FN(batch_norm_relu_forward_autograd));
  m.impl("batch_norm_eval", TORCH_FN(batch_norm_eval_autograd));
}

}  // namespace custom_bn::autograd
