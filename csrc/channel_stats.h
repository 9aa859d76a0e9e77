// Per-channel statistics on the host side of every backend (CPU and CUDA alike): their dtype,
// how many values a channel holds, what the backward normalizes with, and the parameter
// gradients from the backward sums.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <utility>

namespace custom_bn {

// float64 for float64 input, float32 otherwise: the dtype of statistics and save_* tensors.
at::ScalarType stat_dtype(at::ScalarType input_dtype);

// The input's options with the statistics dtype.
at::TensorOptions stat_options(const at::Tensor& input);

// N * S of an (N, C, *) input; 0 when it has no channels.
int64_t values_per_channel(const at::Tensor& input);

// `t` (any shape of `channels` elements) as a contiguous (channels,) tensor of `dtype`: `t`
// itself when it already is one, without a dispatcher call (every op's per-call path reads its
// parameters and statistics through this), else a converted copy.
at::Tensor channel_vector(const at::Tensor& t, int64_t channels, at::ScalarType dtype);

// What normalizes a channel: mean and invstd, contiguous (C,) tensors of the statistics dtype.
struct ChannelStats {
  at::Tensor mean;
  at::Tensor invstd;
};

// invstd = 1 / sqrt(running_var + eps) per channel, by the backend's kernel (each evaluates
// batch_norm_math.h's invstd_from_var).
using EvalInvstd = at::Tensor (*)(const at::Tensor& running_var,
                                  const at::TensorOptions& stat_options, double eps);

// Eval: the running statistics (given: eval without them is an error).
ChannelStats eval_stats(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                        const std::optional<at::Tensor>& running_var, double eps,
                        EvalInvstd eval_invstd);

// The backward's: save_* in training, the running statistics in eval.
ChannelStats backward_stats(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const at::Tensor& save_mean, const at::Tensor& save_invstd,
                            bool training, double eps, EvalInvstd eval_invstd);

// (grad_weight, grad_bias) = (sum_dy_xmu * invstd, sum_dy) in weight's dtype (the input's when
// there is none), each undefined unless wanted. grad_weight is a fresh tensor; grad_bias is
// sum_dy itself when that has the dtype already, so a caller that also returns sum_dy (an
// output must not alias another) copies one of them.
std::pair<at::Tensor, at::Tensor> param_grads(const at::Tensor& sum_dy,
                                              const at::Tensor& sum_dy_xmu,
                                              const at::Tensor& invstd, const at::Tensor& input,
                                              const std::optional<at::Tensor>& weight,
                                              bool weight_g, bool bias_g);

}  // namespace custom_bn
