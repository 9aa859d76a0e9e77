// Argument checks shared by every backend. They read sizes symbolically, so the Meta kernels
// run them too under dynamic shapes. Every check runs before anything is written.
#pragma once

#include "activation.h"
#include "channel_stats.h"
#include "optional_tensor.h"

#include <ATen/core/Tensor.h>

#include <optional>

namespace custom_bn {

// input: floating (float32/64, bfloat16, float16), at least 2 dims (N, C, *); errors call it
// `name` (an op whose first tensor is an output names it so).
void check_input(const char* op, const at::Tensor& input, const char* name = "input");

// `t` (named `name`) on the input's device.
void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& input);

// weight, bias, running_mean, running_var: C elements each, the input's device, and one
// common dtype that is the input's, or float32 with bfloat16/float16 input.
void check_channel_params(const char* op, const at::Tensor& input,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var);

// Whether weight, bias and the running stats have a dtype the kernels take with this input's:
// the input's, or float32 with bfloat16/float16 input, all alike.
bool params_fit_input_dtype(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var);

// batch_norm_eval's arguments: batch_norm_forward's in evaluation mode, and a residual only
// with relu.
void check_batch_norm_eval(const char* op, const at::Tensor& input,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, bool relu,
                           const std::optional<at::Tensor>& residual);

// A per-channel statistics tensor (mean, invstd, save_*): `channels` elements of `dtype`.
void check_stat(const char* op, const char* name, const at::Tensor& stat, const at::Tensor& input,
                const c10::SymInt& channels, at::ScalarType dtype);

// A tensor that must have the input's shape, dtype and device (grad_output, residual, output).
void check_like_input(const char* op, const char* name, const at::Tensor& t,
                      const at::Tensor& input);

// grad_output: the input's shape, dtype and device.
void check_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& input);

// The bookkeeping of a running-stats update: num_batches_tracked (an int64 scalar on the
// device of `like`) and a momentum, or num_batches_tracked for momentum = None.
void check_running_update(const char* op, const at::Tensor& like,
                          const std::optional<at::Tensor>& num_batches_tracked,
                          std::optional<double> momentum, bool updates_running_stats);

// All checks of batch_norm / batch_norm_forward, including "more than 1 value per channel
// when training" and "running_mean must be defined in evaluation mode"; for
// batch_norm_relu_forward also the residual (the input's shape, dtype and device).
void check_batch_norm_forward(const char* op, const at::Tensor& input,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var,
                              const std::optional<at::Tensor>& num_batches_tracked, bool training,
                              std::optional<double> momentum,
                              const std::optional<at::Tensor>& residual = std::nullopt);

// batch_norm_backward's checks; for batch_norm_relu_backward also the forward's output.
void check_batch_norm_backward(const at::Tensor& grad_output, const at::Tensor& input,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var,
                               const at::Tensor& save_mean, const at::Tensor& save_invstd,
                               bool training, const char* op = "custom_bn::batch_norm_backward",
                               const std::optional<at::Tensor>& relu_output = std::nullopt,
                               const std::optional<at::Tensor>& bias = std::nullopt);

// batch_norm_elemt and the input side of the backward stage ops: mean and invstd are
// per-channel statistics of the statistics dtype.
void check_elemt(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                 const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                 const at::Tensor& invstd);

void check_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                          const at::Tensor& mean, const at::Tensor& invstd,
                          const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy,
                          const at::Tensor& sum_dy_xmu, const at::Tensor& count);

// mean and m2 of shape (R, C), counts with R elements, running stats with C.
void check_gather_stats(const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& counts,
                        const std::optional<at::Tensor>& running_mean,
                        const std::optional<at::Tensor>& running_var,
                        const std::optional<at::Tensor>& num_batches_tracked,
                        std::optional<double> momentum);

}  // namespace custom_bn
