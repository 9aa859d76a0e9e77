// The custom_bn operators, callable from C++. Each call goes through the PyTorch dispatcher,
// so LibTorch programs get autograd, every registered backend and the Meta kernels.
// Schemas and semantics: csrc/schemas.cpp and the README; they match torch.batch_norm.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

namespace custom_bn {

// The differentiable entry point: a drop-in for torch::batch_norm (without cudnn_enabled),
// plus num_batches_tracked, which it increments when training with running stats.
// momentum = std::nullopt means the cumulative average, 1 / num_batches_tracked.
at::Tensor batch_norm(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& running_mean,
                      const std::optional<at::Tensor>& running_var, bool training,
                      std::optional<double> momentum, double eps,
                      const std::optional<at::Tensor>& num_batches_tracked = std::nullopt);

// Returns (output, save_mean, save_invstd). In eval, save_mean and save_invstd are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps);

// Evaluation mode as a pure function: normalizes with running_mean and running_var, which it
// only reads; with relu, batch_norm_relu's activation of (batch_norm(input) + residual)
// (residual and the activation's parameters only with relu).
// batch_norm and batch_norm_relu with training=False call it. (No default arguments: the
// backends declare their kernels through this declaration's type, which nvcc refuses with them.)
at::Tensor batch_norm_eval(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, double eps, bool relu,
                           const std::optional<at::Tensor>& residual, double min_val,
                           std::optional<double> max_val, double negative_slope,
                           c10::string_view activation);

// Returns (grad_input, grad_weight, grad_bias); a gradient masked out is undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, double eps,
    std::array<bool, 3> output_mask);

// act(batch_norm(input) + residual) in one pass forward and one backward; residual (the
// input's shape and dtype) is optional. act is piecewise linear: the identity inside
// (min_val, max_val), negative_slope * v at or below min_val (min_val itself with slope 0),
// max_val at or above it (no max_val: no upper bound). The defaults are ReLU; ReLU6 is
// (0, 6, 0), hardtanh(a, b) (a, b, 0), LeakyReLU(s) (0, nullopt, s), identity (0, nullopt, 1).
// negative_slope must be >= 0: the backward reads the gradient from the output. Or act is
// smooth: activation "silu", "hardswish" or "gelu" (torch's, approximate="none"), with the
// three parameters at their defaults and no residual ("piecewise_linear" is the one the
// parameters describe). Arguments otherwise as batch_norm.
at::Tensor batch_norm_relu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var, bool training,
                           std::optional<double> momentum, double eps,
                           const std::optional<at::Tensor>& num_batches_tracked = std::nullopt,
                           const std::optional<at::Tensor>& residual = std::nullopt,
                           double min_val = 0.0, std::optional<double> max_val = std::nullopt,
                           double negative_slope = 0.0,
                           c10::string_view activation = "piecewise_linear");

// Returns (output, save_mean, save_invstd), as batch_norm_forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, const std::optional<at::Tensor>& residual,
    bool training, std::optional<double> momentum, double eps, double min_val,
    std::optional<double> max_val, double negative_slope, c10::string_view activation);

// Returns (grad_input, grad_weight, grad_bias, grad_residual) from grad_output and the
// forward's output (which tells a piecewise-linear activation's gradient), with the forward's
// activation arguments; a gradient masked out is undefined. A smooth activation's gradient is
// taken at the pre-activation, recomputed from input, weight and bias (the forward's bias;
// nullopt: none).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, std::array<bool, 4> output_mask,
    double min_val, std::optional<double> max_val, double negative_slope,
    c10::string_view activation, const std::optional<at::Tensor>& bias);

// In-place activated batch norm: batch_norm_relu with a piecewise-linear activation whose
// output overwrites input; returns input. The activation is one that the output inverts where
// its gradient is not zero: identity, ReLU, ReLU6/hardtanh (negative_slope 0) or
// LeakyReLU(s > 0) (min_val 0). In training it keeps for the backward the output, the residual
// and the input values the output cannot give back (csrc/composite/inplace.cpp), not the
// input. input must be writable: no internal overlap, and, for autograd, not a leaf that
// requires grad nor a tensor whose value autograd still needs (torch's errors).
at::Tensor& batch_norm_relu_(at::Tensor& input, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, bool training,
                             std::optional<double> momentum, double eps,
                             const std::optional<at::Tensor>& num_batches_tracked = std::nullopt,
                             const std::optional<at::Tensor>& residual = std::nullopt,
                             double min_val = 0.0, std::optional<double> max_val = std::nullopt,
                             double negative_slope = 0.0);

// batch_norm_relu_'s forward: writes the output over input and returns (save_mean, save_invstd,
// kept_input), kept_input the input values its backward needs (with keep_input; else empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_forward_(
    at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, const std::optional<at::Tensor>& residual,
    bool training, std::optional<double> momentum, double eps, double min_val,
    std::optional<double> max_val, double negative_slope, bool keep_input);

// batch_norm_relu_'s backward from its output (and residual) and kept_input, as
// batch_norm_relu_backward computes it from the input: (grad_input, grad_weight, grad_bias,
// grad_residual), a gradient masked out undefined. bias and residual are the forward's.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_inplace_backward(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& kept_input,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, std::array<bool, 4> output_mask,
    double min_val, std::optional<double> max_val, double negative_slope);

// Stage ops, for statistics that span processes (SyncBatchNorm). Statistics are float32
// (float64 for float64 input).

// Per-channel statistics of a local batch: (count [1], mean [C], M2 [C]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input);

// Merges per-rank statistics (mean [R, C], M2 [R, C], counts [R]; a count may be 0) by
// parallel Welford, updates the running stats as batch_norm_forward does, and returns the
// global (mean, invstd).
std::tuple<at::Tensor, at::Tensor> batch_norm_gather_stats_with_counts(
    const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& counts,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
    double eps);

// output = (input - mean) * invstd * weight + bias.
at::Tensor batch_norm_elemt(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                            const at::Tensor& invstd);

// Per-channel sums of the backward: (sum_dy, sum_dy_xmu, grad_weight, grad_bias). sum_dy and
// sum_dy_xmu are undefined unless input_g; grad_weight unless weight_g; grad_bias unless bias_g.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool input_g, bool weight_g,
    bool bias_g);

// grad_input from the (globally reduced) sums; count holds per-rank element counts whose
// sum is the number of values per channel.
at::Tensor batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                                     const at::Tensor& mean, const at::Tensor& invstd,
                                     const std::optional<at::Tensor>& weight,
                                     const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                     const at::Tensor& count);

// The normalized input (input - mean) * invstd of a batch_norm_relu_forward_ call that kept
// kept_input, from its output (and residual), in the statistics dtype and the output's layout:
// the backward of in-place activated batch norm over processes (SyncBatchNorm) reduces it.
// weight, bias, residual and the activation are the forward's; mean and invstd its statistics.
at::Tensor batch_norm_relu_normalized_input(const at::Tensor& output, const at::Tensor& kept_input,
                                            const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& residual,
                                            const at::Tensor& mean, const at::Tensor& invstd,
                                            double min_val, std::optional<double> max_val,
                                            double negative_slope);

}  // namespace custom_bn
