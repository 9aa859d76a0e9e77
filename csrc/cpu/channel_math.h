// Per-channel work of the CPU ops: short loops over C that apply the shared math of
// csrc/batch_norm_math.h to contiguous tensors of the statistics dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace custom_bn::cpu {

// A per-channel parameter as a contiguous tensor of `dtype`, or `fill` when absent.
at::Tensor channel_param(const std::optional<at::Tensor>& param, int64_t channels,
                         const at::TensorOptions& options, double fill);

// invstd = 1 / sqrt(m2 / count + eps); zeros when count is 0.
at::Tensor invstd_from_m2(const at::Tensor& m2, double count, double eps);
// The same into a (C,) tensor `invstd` of m2's dtype.
void fill_invstd_from_m2(const at::Tensor& m2, double count, double eps, at::Tensor& invstd);

// invstd = 1 / sqrt(var + eps) per channel, for eval with running_var (any float dtype, any
// strides): the scalar invstd_from_var of batch_norm_math.h over a tensor.
at::Tensor invstd_of_running_var(const at::Tensor& var, const at::TensorOptions& stat_options,
                                 double eps);

// (alpha, bias) of y = (x - mean) * alpha + bias, with alpha = invstd * weight.
std::pair<at::Tensor, at::Tensor> affine_coefficients(const at::Tensor& invstd,
                                                      const std::optional<at::Tensor>& weight,
                                                      const std::optional<at::Tensor>& bias);

// (a, b, dy_mean) of grad_x = a * (dy - dy_mean) + b * (x - mean); training uses the sums,
// eval only invstd.
struct GradInputCoefficientTensors {
  at::Tensor a, b, dy_mean;
};
GradInputCoefficientTensors grad_input_coefficients(bool training, const at::Tensor& invstd,
                                                    const std::optional<at::Tensor>& weight,
                                                    const at::Tensor& sum_dy,
                                                    const at::Tensor& sum_dy_xmu, double count);

// Merges per-rank (count, mean, M2) by parallel Welford, rank by rank in order.
struct MergedStats {
  at::Tensor mean, m2;
  double count;
};
MergedStats merge_stats(const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& counts);

// The bookkeeping at the end of a training step: num_batches_tracked += 1 (when given), then
// running = (1 - m) * running + m * batch, with m = momentum or 1 / num_batches_tracked and
// the unbiased variance m2 / (count - 1). Running stats stay untouched when count is 0.
// Call only after every check has passed: this is the one place that writes them.
void update_running_stats(const at::Tensor& batch_mean, const at::Tensor& batch_m2, double count,
                          const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var,
                          const std::optional<at::Tensor>& num_batches_tracked,
                          std::optional<double> momentum);

}  // namespace custom_bn::cpu
