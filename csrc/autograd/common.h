// What the Autograd kernels of batch_norm and batch_norm_relu share: optional-argument
// plumbing and the backward written with differentiable ATen ops (for double backward).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

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
