// batch_norm's derivatives written with differentiable ATen ops, once, for what the kernels
// do not cover: the backward ops' own derivatives (double backward) and forward-mode AD (jvp).
// Both differentiate the same normalization,
//   x_hat = (x - mean) * invstd,   y = x_hat * weight + bias,
// with mean and invstd the batch's (training: functions of x) or the running stats' (eval:
// constants).
#pragma once

#include "activation.h"

#include <ATen/core/Tensor.h>

#include <array>

namespace custom_bn::autograd {

// batch_norm's backward: (grad_input, grad_weight, grad_bias), each undefined where
// output_mask is false. The batch statistics are recomputed from input, so that their
// dependence on input is part of the graph: the backward op's forward-mode tangents come from
// running it on dual tensors.
std::array<at::Tensor, 3> differentiable_backward(const at::Tensor& grad_output,
                                                  const at::Tensor& input, const at::Tensor& weight,
                                                  const at::Tensor& running_mean,
                                                  const at::Tensor& running_var, bool training,
                                                  double eps, std::array<bool, 3> output_mask);

// The backward of batch_norm's backward: for the gradients (gg_input, gg_weight, gg_bias) of
// its results (grad_input, grad_weight, grad_bias), the gradients of (grad_output, input,
// weight), each undefined where output_mask is false or where it is zero. An undefined gg_* is
// zero. Written in differentiable ATen ops, so that it has derivatives of its own.
std::array<at::Tensor, 3> double_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                          const at::Tensor& weight, const at::Tensor& running_mean,
                                          const at::Tensor& running_var, bool training, double eps,
                                          const at::Tensor& gg_input, const at::Tensor& gg_weight,
                                          const at::Tensor& gg_bias,
                                          std::array<bool, 3> output_mask);

// The tangent of y for tangents (input_tangent, weight_tangent, bias_tangent) of (input,
// weight, bias); an undefined tangent is zero. In the output's dtype.
at::Tensor forward_tangent(const at::Tensor& input, const at::Tensor& weight,
                           const at::Tensor& running_mean, const at::Tensor& running_var,
                           bool training, double eps, const at::Tensor& input_tangent,
                           const at::Tensor& weight_tangent, const at::Tensor& bias_tangent);

// grad times the fused op's activation derivative read from its output (1 inside (lower,
// upper), slope at or below lower, 0 at or above upper), a constant of the graph: its own
// derivative is zero almost everywhere. Undefined output: no activation, grad itself.
at::Tensor activation_grad(const at::Tensor& grad, const at::Tensor& output, const Activation& act);

// A fused op's pre-activation x_hat * weight + bias (undefined weight: 1, bias: 0), in the
// statistics dtype, differentiable in input, weight and bias.
at::Tensor pre_activation(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& running_mean, const at::Tensor& running_var,
                          bool training, double eps);

// grad times a smooth activation's derivative at the pre-activation v, by torch's own backward
// ops, which have derivatives of their own (hardswish_backward, gelu_backward), or for SiLU,
// whose silu_backward has none, by its formula.
// Computed in v's dtype, returned in grad's.
at::Tensor activation_grad_at(const at::Tensor& grad, const at::Tensor& v, const Activation& act);

}  // namespace custom_bn::autograd
