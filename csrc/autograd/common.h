// What the Autograd kernels of batch_norm and batch_norm_relu share: optional-argument
// plumbing, what their contexts keep, and the backward written with differentiable ATen ops
// (for double backward).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/autograd.h>

#include <array>
#include <optional>
#include <vector>

namespace custom_bn::autograd {

inline at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

inline std::optional<at::Tensor> as_optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

inline std::optional<at::Tensor> defined_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t : std::nullopt;
}

// What a batch-norm Function keeps for its backward: the options, and the tensors
// batch_norm_backward reads (eval reads the running stats; training mutates them and needs
// only save_*), then `extra` (batch_norm_relu's output).
void save_batch_norm_context(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                             const std::optional<at::Tensor>& weight, bool has_bias,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, bool training,
                             double eps, const at::Tensor& save_mean, const at::Tensor& save_invstd,
                             const std::vector<at::Tensor>& extra = {});

struct BatchNormContext {
  at::Tensor input, weight, running_mean, running_var, save_mean, save_invstd;
  std::vector<at::Tensor> extra;
  bool training;
  double eps;
  // Which of (input, weight, bias) need a gradient. Absent optionals have no graph edge, so
  // bias's edge is 1 or 2.
  std::array<bool, 3> output_mask;
};
BatchNormContext load_batch_norm_context(torch::autograd::AutogradContext* ctx);

// batch_norm's backward with ATen ops. The batch statistics are recomputed from input rather
// than taken from the saved ones, so that their dependence on input is part of the graph:
// second-order gradients need it. Returns (grad_input, grad_weight, grad_bias), each
// undefined where output_mask is false.
std::array<at::Tensor, 3> differentiable_backward(const at::Tensor& grad_output,
                                                  const at::Tensor& input, const at::Tensor& weight,
                                                  const at::Tensor& running_mean,
                                                  const at::Tensor& running_var, bool training,
                                                  double eps, std::array<bool, 3> output_mask);

}  // namespace custom_bn::autograd
