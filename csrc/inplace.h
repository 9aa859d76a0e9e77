// In-place activated batch norm (batch_norm_relu_ and its stage ops): the checks every backend
// runs and the one definition of what the backward recovers from the output, in ATen ops, so
// that every backend computes it alike.
//
// The forward writes y = act(x_hat * weight + bias + residual) over x. Where the activation's
// gradient is not zero, act inverts: z = act^-1(y), and x_hat = (z - bias - residual) / weight.
// That recovery is exact to a few roundings of y where |weight| dominates |bias| + |residual|;
// elsewhere, and where act clipped (its gradient is 0 there, but the input gradient of training
// still reads x_hat), the forward keeps the input values, in order, as kept_input.
#pragma once

#include "activation.h"
#include "op_params.h"

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace custom_bn {

// Recovery divides by |weight|: y carries a rounding error of about ulp(y), and
// |y| <= |x_hat * weight| + |bias| + |residual|, so the error of the recovered x_hat is about
// ulp(1) * (|x_hat| + (|bias| + |residual|) / |weight|). Where the offset is below
// kRecoveryMargin weights, that is a few roundings, as the input's own x_hat carries (tested
// against float64 in every dtype); beyond, the input is kept.
constexpr double kRecoveryMargin = 4.0;

// The activation of an in-place call (piecewise linear: the parameters of batch_norm_relu).
Activation checked_inplace_activation(const char* op, double min_val, std::optional<double> max_val,
                                      double negative_slope);

// batch_norm_relu_forward_'s checks: batch_norm_relu_forward's, and an input that can be
// written (no two elements at one address).
void check_batch_norm_relu_forward_inplace(const char* op, const at::Tensor& input,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& running_mean,
                                           const std::optional<at::Tensor>& running_var,
                                           const std::optional<at::Tensor>& num_batches_tracked,
                                           const std::optional<at::Tensor>& residual, bool training,
                                           std::optional<double> momentum);

// batch_norm_relu_inplace_backward's checks.
void check_batch_norm_relu_inplace_backward(
    const char* op, const at::Tensor& grad_output, const at::Tensor& output,
    const at::Tensor& kept_input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training);

// batch_norm_relu_normalized_input's checks: batch_norm_elemt's on the output, the residual's
// and kept_input's.
void check_batch_norm_relu_normalized_input(const char* op, const at::Tensor& output,
                                            const at::Tensor& kept_input,
                                            const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& residual,
                                            const at::Tensor& mean, const at::Tensor& invstd);

// Where the backward cannot recover the input from the output (a bool tensor of output's
// shape): where act clipped (output at a bound whose slope is 0, or infinite), and where
// |bias| + |residual| >= kRecoveryMargin * |weight| (also weight 0 and NaN). Compared in the
// statistics dtype, as the kernels compare.
at::Tensor kept_positions(const at::Tensor& output, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, const Activation& act);

// The order kept_input holds its values in: the input's dims by decreasing stride (a stable
// sort), which is memory order for a dense input, so that a kernel can walk memory.
std::vector<int64_t> memory_order(const at::Tensor& t);

// The two steps a backend may do its own way (the CPU kernels walk memory); these are
// in the backends' own ops.
struct InplaceSteps {
  // Writes the output over the input and returns kept_input: the input values at
  // kept_positions, in memory_order.
  at::Tensor (*write_output_keeping_input)(at::Tensor& input, const at::Tensor& output,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& residual,
                                           const Activation& act);
  // x_hat at every position, in the statistics dtype and the output's layout: recovered from the
  // output where kept_positions is false, from kept_input (normalized with mean and invstd)
  // where it is true. (A kept_input with as many values as the output holds every input value,
  // and does not come here.)
  // (`op` names the caller in errors.)
  at::Tensor (*normalized_input)(const char* op, const at::Tensor& output,
                                 const at::Tensor& kept_input,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual, const at::Tensor& mean,
                                 const at::Tensor& invstd, const Activation& act);
  // Optional: training's whole forward, for a backend that computes the output a piece at a
  // time as it writes it over the input (no output tensor): (save_mean, save_invstd,
  // kept_input), bitwise what batch_norm_relu_forward then write_output_keeping_input give;
  // nullopt where it does not apply, and those two steps run. Called after the checks.
  std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> (*training_forward)(
      at::Tensor& input, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
      const std::optional<at::Tensor>& running_var,
      const std::optional<at::Tensor>& num_batches_tracked,
      const std::optional<at::Tensor>& residual, std::optional<double> momentum, double eps,
      const Activation& act) = nullptr;
  // Optional: the backward's gradients (grad_input, grad_weight, grad_bias, grad_residual) with
  // no x_hat tensor, for a backend that recovers x_hat a piece at a time as it uses it; the same
  // gradients as normalized_input then batch_norm_relu_backward on x_hat, to rounding (the sums
  // go in another order). nullopt where it does not apply. Called after the checks, with the
  // statistics in the statistics dtype, for an output that does not keep every value.
  std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>> (*backward)(
      const char* op, const at::Tensor& grad_output, const at::Tensor& output,
      const at::Tensor& kept_input, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
      const at::Tensor& mean, const at::Tensor& invstd, bool training,
      std::array<bool, 4> output_mask, const Activation& act) = nullptr;
};

// The steps in ATen ops, for every backend.
extern const InplaceSteps kGenericInplaceSteps;

// The ops, with a backend's steps.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_forward_inplace(
    const InplaceSteps& steps, CUSTOM_BN_BATCH_NORM_RELU_FORWARD_INPLACE_PARAMS);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_inplace_backward(
    const InplaceSteps& steps, CUSTOM_BN_BATCH_NORM_RELU_INPLACE_BACKWARD_PARAMS);

at::Tensor run_normalized_input(const InplaceSteps& steps,
                                CUSTOM_BN_BATCH_NORM_RELU_NORMALIZED_INPUT_PARAMS);

// The stage ops' kernels of a backend whose steps are `Steps`, for TORCH_LIBRARY_IMPL.
template <const InplaceSteps& Steps>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_inplace_kernel(
    CUSTOM_BN_BATCH_NORM_RELU_FORWARD_INPLACE_PARAMS) {
  return run_forward_inplace(Steps, input, weight, bias, running_mean, running_var,
                             num_batches_tracked, residual, training, momentum, eps,
                             CUSTOM_BN_INPLACE_ACTIVATION_ARGS, keep_input);
}

template <const InplaceSteps& Steps>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> inplace_backward_kernel(
    CUSTOM_BN_BATCH_NORM_RELU_INPLACE_BACKWARD_PARAMS) {
  return run_inplace_backward(Steps, grad_output, output, kept_input, weight, bias, residual,
                              running_mean, running_var, save_mean, save_invstd, training, eps,
                              output_mask, CUSTOM_BN_INPLACE_ACTIVATION_ARGS);
}

template <const InplaceSteps& Steps>
at::Tensor normalized_input_kernel(CUSTOM_BN_BATCH_NORM_RELU_NORMALIZED_INPUT_PARAMS) {
  return run_normalized_input(Steps, output, kept_input, weight, bias, residual, mean, invstd,
                              CUSTOM_BN_INPLACE_ACTIVATION_ARGS);
}

// Registers the three stage ops of a backend whose steps are `steps` (a const InplaceSteps with
// linkage), inside its TORCH_LIBRARY_IMPL block `m`.
#define CUSTOM_BN_REGISTER_INPLACE_OPS(m, steps)                                            \
  m.impl("batch_norm_relu_forward_", TORCH_FN(::custom_bn::forward_inplace_kernel<steps>)); \
  m.impl("batch_norm_relu_inplace_backward",                                                \
         TORCH_FN(::custom_bn::inplace_backward_kernel<steps>));                            \
  m.impl("batch_norm_relu_normalized_input", TORCH_FN(::custom_bn::normalized_input_kernel<steps>))

// That kept_input has the kept count the output and residual give.
void check_kept_count(const char* op, int64_t kept, const at::Tensor& kept_input);

// Whether the forward keeps every input value of this dtype: recovery from a bfloat16 or
// float16 output carries its rounding (2^-9, 2^-12 of x_hat) into the weight gradient's sum,
// beyond torch's accuracy, which normalizes the exact input. So in low precision the in-place
// form keeps what torch keeps; its saving is in float32 and float64.
bool keeps_every_value(at::ScalarType dtype);

}  // namespace custom_bn
