// The CPU kernels of every op: checks, then the kernels of csrc/cpu/kernels.h over the
// input in a layout they walk, then (for training) the running-stats bookkeeping last.
#include "backends.h"
#include "checks.h"
#include "cpu/channel_math.h"
#include "cpu/kernels.h"
#include "cpu/layout.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace custom_bn::cpu {
namespace {

at::TensorOptions stat_options(const at::Tensor& input) {
  return input.options().dtype(stat_dtype(input.scalar_type()));
}

int64_t values_per_channel(const at::Tensor& input) {
  return input.size(1) == 0 ? 0 : input.numel() / input.size(1);
}

// (mean, m2) of each channel; zeros for an empty batch.
std::pair<at::Tensor, at::Tensor> channel_stats(const DenseTensor& dense) {
  const int64_t channels = dense.tensor.size(1);
  at::Tensor mean = at::zeros({channels}, stat_options(dense.tensor));
  at::Tensor m2 = at::zeros({channels}, stat_options(dense.tensor));
  if (dense.tensor.numel() > 0) kernels().collect_stats(dense.tensor, dense.view, mean, m2);
  return {mean, m2};
}

// The output pass: (input - mean) * invstd * weight + bias, or with `relu`,
// relu(that + residual) (residual may be undefined).
at::Tensor normalize(const at::Tensor& input, const DenseTensor& dense, const at::Tensor& mean,
                     const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, bool relu = false,
                     const std::optional<at::Tensor>& residual = std::nullopt) {
  const auto [alpha, shift] = affine_coefficients(invstd, weight, bias);
  return elementwise_result(input, dense, [&](at::Tensor& out) {
    if (relu) {
      kernels().apply_affine_relu(dense.tensor,
                                  has(residual) ? align_to(*residual, dense) : at::Tensor(),
                                  dense.view, mean, alpha, shift, out);
    } else {
      kernels().apply_affine(dense.tensor, dense.view, mean, alpha, shift, out);
    }
  });
}

// (sum_dy, sum_dy_xmu) of each channel.
std::pair<at::Tensor, at::Tensor> grad_sums(const at::Tensor& grad_output, const DenseTensor& dense,
                                            const at::Tensor& mean) {
  const int64_t channels = dense.tensor.size(1);
  at::Tensor sum_dy = at::zeros({channels}, mean.options());
  at::Tensor sum_dy_xmu = at::zeros({channels}, mean.options());
  if (dense.tensor.numel() > 0) {
    kernels().reduce_grad(align_to(grad_output, dense), dense.tensor, dense.view, mean, sum_dy,
                          sum_dy_xmu);
  }
  return {sum_dy, sum_dy_xmu};
}

at::Tensor grad_input_from_sums(bool training, const at::Tensor& grad_output,
                                const at::Tensor& input, const DenseTensor& dense,
                                const at::Tensor& mean, const at::Tensor& invstd,
                                const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy,
                                const at::Tensor& sum_dy_xmu, double count) {
  const GradInputCoefficientTensors k =
      grad_input_coefficients(training, invstd, weight, sum_dy, sum_dy_xmu, count);
  return elementwise_result(input, dense, [&](at::Tensor& out) {
    kernels().apply_grad_input(align_to(grad_output, dense), dense.tensor, dense.view, mean,
                               k.dy_mean, k.a, k.b, out);
  });
}

// grad_weight / grad_bias in the dtype of weight (the input's when there is none).
at::Tensor as_param_grad(const at::Tensor& grad, const at::Tensor& input,
                         const std::optional<at::Tensor>& weight) {
  // Always a fresh tensor: a returned gradient must not alias another output.
  return grad.to(has(weight) ? weight->scalar_type() : input.scalar_type(), /*non_blocking=*/false,
                 /*copy=*/true);
}

// The forward of batch_norm_forward and (relu = true) batch_norm_relu_forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, bool relu,
    const std::optional<at::Tensor>& residual) {
  check_batch_norm_forward(op, input, weight, bias, running_mean, running_var, num_batches_tracked,
                           training, momentum, residual);
  const DenseTensor dense = make_dense(input);
  if (!training) {
    const at::Tensor mean = channel_param(running_mean, input.size(1), stat_options(input), 0.0);
    const at::Tensor invstd = invstd_from_var(*running_var, stat_options(input), eps);
    return {normalize(input, dense, mean, invstd, weight, bias, relu, residual),
            at::empty({0}, stat_options(input)), at::empty({0}, stat_options(input))};
  }
  const double count = static_cast<double>(values_per_channel(input));
  at::Tensor output, mean, m2, invstd;
  // A channel at a time; not with a residual, whose extra read stream measured slower than
  // the two-kernel path (docs/perf.md).
  if (!has(residual) && fits_by_channel(dense.view, 1, input.element_size())) {
    const int64_t channels = input.size(1);
    mean = at::empty({channels}, stat_options(input));
    m2 = at::empty({channels}, stat_options(input));
    invstd = at::empty({channels}, stat_options(input));
    output = elementwise_result(input, dense, [&](at::Tensor& out) {
      kernels().normalize_by_channel(dense.tensor, dense.view,
                                     channel_param(weight, channels, stat_options(input), 1.0),
                                     channel_param(bias, channels, stat_options(input), 0.0), eps,
                                     relu, mean, m2, invstd, out);
    });
  } else {
    std::tie(mean, m2) = channel_stats(dense);
    invstd = invstd_from_m2(m2, count, eps);
    output = normalize(input, dense, mean, invstd, weight, bias, relu, residual);
  }
  update_running_stats(mean, m2, count, running_mean, running_var, num_batches_tracked, momentum);
  return {output, mean, invstd};
}

// (mean, invstd) the backward uses: saved (training) or from the running stats (eval).
std::pair<at::Tensor, at::Tensor> backward_stats(const at::Tensor& input,
                                                 const std::optional<at::Tensor>& running_mean,
                                                 const std::optional<at::Tensor>& running_var,
                                                 const at::Tensor& save_mean,
                                                 const at::Tensor& save_invstd, bool training,
                                                 double eps) {
  if (training) {
    return {save_mean.reshape({-1}).contiguous(), save_invstd.reshape({-1}).contiguous()};
  }
  return {channel_param(running_mean, input.size(1), stat_options(input), 0.0),
          invstd_from_var(*running_var, stat_options(input), eps)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps) {
  return forward("custom_bn::batch_norm_forward", input, weight, bias, running_mean, running_var,
                 num_batches_tracked, training, momentum, eps, /*relu=*/false, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, const std::optional<at::Tensor>& residual,
    bool training, std::optional<double> momentum, double eps) {
  return forward("custom_bn::batch_norm_relu_forward", input, weight, bias, running_mean,
                 running_var, num_batches_tracked, training, momentum, eps, /*relu=*/true,
                 residual);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, double eps,
    std::array<bool, 3> output_mask) {
  check_batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                            save_invstd, training);
  at::Tensor mean, invstd;
  std::tie(mean, invstd) =
      backward_stats(input, running_mean, running_var, save_mean, save_invstd, training, eps);
  const DenseTensor dense = make_dense(input);
  at::Tensor sum_dy, sum_dy_xmu, grad_input, grad_weight, grad_bias;
  if (training && output_mask[0] && fits_by_channel(dense.view, 2, input.element_size())) {
    // The sums and the input gradient a channel at a time.
    sum_dy = at::empty_like(mean);
    sum_dy_xmu = at::empty_like(mean);
    grad_input = elementwise_result(input, dense, [&](at::Tensor& out) {
      kernels().grad_input_by_channel(
          align_to(grad_output, dense), at::Tensor(), dense.tensor, dense.view, mean, invstd,
          channel_param(weight, input.size(1), mean.options(), 1.0), sum_dy, sum_dy_xmu, out);
    });
  } else {
    const bool need_sums = output_mask[1] || output_mask[2] || (training && output_mask[0]);
    if (need_sums) std::tie(sum_dy, sum_dy_xmu) = grad_sums(grad_output, dense, mean);
  }
  if (output_mask[0] && !grad_input.defined()) {
    grad_input =
        grad_input_from_sums(training, grad_output, input, dense, mean, invstd, weight, sum_dy,
                             sum_dy_xmu, static_cast<double>(values_per_channel(input)));
  }
  if (output_mask[1]) grad_weight = as_param_grad(sum_dy_xmu * invstd, input, weight);
  if (output_mask[2]) grad_bias = as_param_grad(sum_dy, input, weight);
  return {grad_input, grad_weight, grad_bias};
}

// ReLU's backward fused into both passes of batch_norm's backward: the reduction reads
// (dy, output, x) and sums dz = relu_grad(dy, output); the elementwise pass computes dx from
// (dy, output, x). With a residual, whose gradient is dz itself, the reduction writes dz and
// the elementwise pass reads it instead of (dy, output): one tensor less to read, and dz is
// an output anyway.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, std::array<bool, 4> output_mask) {
  const char* op = "custom_bn::batch_norm_relu_backward";
  check_batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                            save_invstd, training, op, output);
  at::Tensor mean, invstd;
  std::tie(mean, invstd) =
      backward_stats(input, running_mean, running_var, save_mean, save_invstd, training, eps);
  const DenseTensor dense = make_dense(input);
  const int64_t channels = input.size(1);
  const at::Tensor dy = align_to(grad_output, dense);
  const at::Tensor out = align_to(output, dense);
  at::Tensor sum_dy = at::zeros({channels}, mean.options());
  at::Tensor sum_dy_xmu = at::zeros({channels}, mean.options());
  std::optional<ResultBuffer> grad_residual;
  if (output_mask[3]) grad_residual.emplace(input, dense);
  at::Tensor grad_input;
  // The sums and the input gradient a channel at a time; not when dz is written too (the
  // residual's gradient): that write stream measured slower than the two-kernel path.
  if (training && output_mask[0] && !grad_residual &&
      fits_by_channel(dense.view, 3, input.element_size())) {
    grad_input = elementwise_result(input, dense, [&](at::Tensor& result) {
      kernels().grad_input_by_channel(dy, out, dense.tensor, dense.view, mean, invstd,
                                      channel_param(weight, channels, mean.options(), 1.0), sum_dy,
                                      sum_dy_xmu, result);
    });
  } else {
    if (input.numel() > 0) {
      at::Tensor no_masked_output;
      kernels().reduce_grad_relu(dy, out, dense.tensor, dense.view, mean, sum_dy, sum_dy_xmu,
                                 grad_residual ? grad_residual->buffer : no_masked_output);
    }
    if (output_mask[0]) {
      const GradInputCoefficientTensors k =
          grad_input_coefficients(training, invstd, weight, sum_dy, sum_dy_xmu,
                                  static_cast<double>(values_per_channel(input)));
      grad_input = elementwise_result(input, dense, [&](at::Tensor& result) {
        if (grad_residual) {
          kernels().apply_grad_input(grad_residual->buffer, dense.tensor, dense.view, mean,
                                     k.dy_mean, k.a, k.b, result);
        } else {
          kernels().apply_grad_input_relu(dy, out, dense.tensor, dense.view, mean, k.dy_mean, k.a,
                                          k.b, result);
        }
      });
    }
  }
  return {grad_input,
          output_mask[1] ? as_param_grad(sum_dy_xmu * invstd, input, weight) : at::Tensor(),
          output_mask[2] ? as_param_grad(sum_dy, input, weight) : at::Tensor(),
          grad_residual ? grad_residual->finish() : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input) {
  check_input("custom_bn::batch_norm_stats", input);
  const auto [mean, m2] = channel_stats(make_dense(input));
  at::Tensor count = at::full({1}, static_cast<double>(values_per_channel(input)), mean.options());
  return {count, mean, m2};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_gather_stats_with_counts(
    const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& counts,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
    double eps) {
  check_gather_stats(mean, m2, counts, running_mean, running_var, num_batches_tracked, momentum);
  const MergedStats merged = merge_stats(mean, m2, counts);
  at::Tensor invstd = invstd_from_m2(merged.m2, merged.count, eps);
  update_running_stats(merged.mean, merged.m2, merged.count, running_mean, running_var,
                       num_batches_tracked, momentum);
  return {merged.mean, invstd};
}

at::Tensor batch_norm_elemt(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                            const at::Tensor& invstd) {
  check_elemt("custom_bn::batch_norm_elemt", input, weight, bias, mean, invstd);
  return normalize(input, make_dense(input), mean.reshape({-1}).contiguous(),
                   invstd.reshape({-1}).contiguous(), weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool input_g, bool weight_g,
    bool bias_g) {
  const char* op = "custom_bn::batch_norm_backward_reduce";
  check_elemt(op, input, weight, std::nullopt, mean, invstd);
  check_grad_output(op, grad_output, input);
  const at::Tensor invstd_flat = invstd.reshape({-1}).contiguous();
  const auto [sum_dy, sum_dy_xmu] =
      grad_sums(grad_output, make_dense(input), mean.reshape({-1}).contiguous());
  return {input_g ? sum_dy : at::Tensor(), input_g ? sum_dy_xmu : at::Tensor(),
          weight_g ? as_param_grad(sum_dy_xmu * invstd_flat, input, weight) : at::Tensor(),
          bias_g ? as_param_grad(sum_dy, input, weight) : at::Tensor()};
}

at::Tensor batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                                     const at::Tensor& mean, const at::Tensor& invstd,
                                     const std::optional<at::Tensor>& weight,
                                     const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                     const at::Tensor& count) {
  check_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count);
  const double total = count.sum().item<double>();
  return grad_input_from_sums(/*training=*/true, grad_output, input, make_dense(input),
                              mean.reshape({-1}).contiguous(), invstd.reshape({-1}).contiguous(),
                              weight, sum_dy.reshape({-1}).contiguous(),
                              sum_dy_xmu.reshape({-1}).contiguous(), total);
}

TORCH_LIBRARY_IMPL(custom_bn, CPU, m) { CUSTOM_BN_REGISTER_BACKEND_OPS(m); }

}  // namespace custom_bn::cpu
