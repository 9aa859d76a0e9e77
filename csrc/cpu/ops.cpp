// The CPU kernels of every op: checks, then one plan for the call (csrc/cpu/plan.h), then the
// kernels of csrc/cpu/kernels.h over the input in a layout they walk, then (for training) the
// running-stats bookkeeping last.
#include "backends.h"
#include "channel_stats.h"
#include "checks.h"
#include "cpu/channel_math.h"
#include "cpu/kernels.h"
#include "cpu/plan.h"
#include "cpu/result_cache.h"
#include "layout.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

namespace custom_bn::cpu {
namespace {

// A dense view of the input and the plan of the call.
struct PlannedInput {
  DenseTensor dense;
  CpuPlan plan;
};

PlannedInput plan_input(const at::Tensor& input, const char* op, bool training = true,
                        bool residual = false) {
  DenseTensor dense = make_dense(input);
  const CpuPlan plan = plan_call(dense.view, input.scalar_type(), work_of(op, training, residual));
  return {std::move(dense), plan};
}

// A fresh result like the input, in result_memory_format, where the plan puts it.
at::Tensor empty_result(const at::Tensor& input, const CpuPlan& plan, ResultKind kind) {
  const c10::MemoryFormat format = result_memory_format(input, kind);
  if (format == c10::MemoryFormat::Preserve) return empty_result_like(input, kind);
  c10::Allocator* allocator =
      plan.in_result_cache ? static_cast<c10::Allocator*>(&result_cache()) : c10::GetCPUAllocator();
  return at::detail::empty_generic(input.sizes(), allocator,
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), input.scalar_type(),
                                   format);
}

template <typename Run>
at::Tensor planned_result(const at::Tensor& input, const PlannedInput& in, ResultKind kind,
                          const Run& run) {
  return elementwise_result(empty_result(input, in.plan, kind), in.dense, run);
}

at::Tensor eval_invstd(const at::Tensor& running_var, const at::TensorOptions& options,
                       double eps) {
  return invstd_of_running_var(running_var, options, eps);
}

// A (C,) result of a reduction, which writes every channel: left unfilled (a zeros per result
// and call is a dispatcher call and a fill), but zeros for an empty batch, where none runs.
at::Tensor per_channel_result(const PlannedInput& in, const at::TensorOptions& options) {
  return in.dense.tensor.numel() > 0 ? at::empty({in.plan.view.channels}, options)
                                     : at::zeros({in.plan.view.channels}, options);
}

// (mean, m2) of each channel; zeros for an empty batch.
std::pair<at::Tensor, at::Tensor> channel_stats(const PlannedInput& in) {
  const at::TensorOptions options = stat_options(in.dense.tensor);
  at::Tensor mean = per_channel_result(in, options);
  at::Tensor m2 = per_channel_result(in, options);
  if (in.dense.tensor.numel() > 0) kernels().collect_stats(in.dense.tensor, in.plan, mean, m2);
  return {mean, m2};
}

// The output pass: (input - mean) * invstd * weight + bias, or with an activation,
// act(that + residual) (residual may be undefined).
at::Tensor normalize(const at::Tensor& input, const PlannedInput& in, const ChannelStats& stats,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                     const std::optional<Activation>& act = std::nullopt,
                     const std::optional<at::Tensor>& residual = std::nullopt) {
  const auto [alpha, shift] = affine_coefficients(stats.invstd, weight, bias);
  return planned_result(input, in, ResultKind::kOutput, [&](at::Tensor& out) {
    if (act) {
      kernels().apply_affine_activation(
          in.dense.tensor, has(residual) ? align_to(*residual, in.dense) : at::Tensor(), in.plan,
          stats.mean, alpha, shift, *act, out);
    } else {
      kernels().apply_affine(in.dense.tensor, in.plan, stats.mean, alpha, shift, out);
    }
  });
}

// (sum_dy, sum_dy_xmu) of each channel.
std::pair<at::Tensor, at::Tensor> grad_sums(const at::Tensor& grad_output, const PlannedInput& in,
                                            const at::Tensor& mean) {
  at::Tensor sum_dy = per_channel_result(in, mean.options());
  at::Tensor sum_dy_xmu = per_channel_result(in, mean.options());
  if (in.dense.tensor.numel() > 0) {
    kernels().reduce_grad(align_to(grad_output, in.dense), in.dense.tensor, in.plan, mean, sum_dy,
                          sum_dy_xmu);
  }
  return {sum_dy, sum_dy_xmu};
}

// The elementwise input gradient from the sums (training) or from invstd alone (eval).
at::Tensor grad_input_from_sums(bool training, const at::Tensor& grad_output,
                                const at::Tensor& input, const PlannedInput& in,
                                const ChannelStats& stats, const std::optional<at::Tensor>& weight,
                                const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                double count) {
  const GradInputCoefficientTensors k =
      grad_input_coefficients(training, stats.invstd, weight, sum_dy, sum_dy_xmu, count);
  return planned_result(input, in, ResultKind::kGradient, [&](at::Tensor& out) {
    kernels().apply_grad_input(align_to(grad_output, in.dense), in.dense.tensor, in.plan,
                               stats.mean, k.dy_mean, k.a, k.b, out);
  });
}

// Evaluation: the output pass with the running statistics, after the caller's checks.
at::Tensor eval_output(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& running_mean,
                       const std::optional<at::Tensor>& running_var, double eps,
                       const std::optional<Activation>& act,
                       const std::optional<at::Tensor>& residual) {
  const PlannedInput in = plan_input(input, act ? "batch_norm_relu_forward" : "batch_norm_forward",
                                     /*training=*/false, has(residual));
  const ChannelStats stats = eval_stats(input, running_mean, running_var, eps, eval_invstd);
  return normalize(input, in, stats, weight, bias, act, residual);
}

// The forward of batch_norm_forward and (with an activation) batch_norm_relu_forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, const std::optional<Activation>& act,
    const std::optional<at::Tensor>& residual) {
  check_batch_norm_forward(op, input, weight, bias, running_mean, running_var, num_batches_tracked,
                           training, momentum, residual);
  const at::TensorOptions options = stat_options(input);
  if (!training) {
    return {eval_output(input, weight, bias, running_mean, running_var, eps, act, residual),
            at::empty({0}, options), at::empty({0}, options)};
  }
  const PlannedInput in = plan_input(input, act ? "batch_norm_relu_forward" : "batch_norm_forward",
                                     training, has(residual));
  const int64_t channels = in.plan.view.channels;
  at::Tensor mean = per_channel_result(in, options);
  at::Tensor m2 = per_channel_result(in, options);
  at::Tensor invstd = per_channel_result(in, options);
  const at::Tensor output = planned_result(input, in, ResultKind::kOutput, [&](at::Tensor& out) {
    kernels().normalize_training(
        in.dense.tensor, has(residual) ? align_to(*residual, in.dense) : at::Tensor(), in.plan,
        channel_param(weight, channels, options, 1.0), channel_param(bias, channels, options, 0.0),
        eps, act, mean, m2, invstd, out);
  });
  const double count = static_cast<double>(values_per_channel(input));
  update_running_stats(mean, m2, count, running_mean, running_var, num_batches_tracked, momentum);
  return {output, mean, invstd};
}

// The backward of batch_norm_forward (act_output undefined) and batch_norm_relu_forward,
// after the caller's checks: what output_mask asks for (grad_input, grad_weight, grad_bias,
// grad_residual) from one kernel call (KernelTable::backward). The activation's backward is
// fused into both passes: the reduction sums dz = activation_grad(dy, output) and, when the
// residual's gradient
// (dz itself) is wanted, writes dz, which the elementwise pass then reads instead of
// (dy, output): one tensor less to read, and dz is a result anyway.
// A smooth activation's gradient is taken at the pre-activation, recomputed from input, weight
// and bias: once, written as dz for the input-gradient pass, or in each pass
// (writes_smooth_dz).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const char* op, const at::Tensor& grad_output, const at::Tensor& act_output,
    const Activation& act, const at::Tensor& input, CUSTOM_BN_BACKWARD_STATS_PARAMS,
    std::array<bool, 4> output_mask, const std::optional<at::Tensor>& bias = std::nullopt) {
  const ChannelStats stats = backward_stats(input, running_mean, running_var, save_mean,
                                            save_invstd, training, eps, eval_invstd);
  const bool writes_dz = output_mask[3] || writes_smooth_dz(act);
  const PlannedInput in = plan_input(input, op, training, writes_dz);
  const bool wants_sums =
      output_mask[1] || output_mask[2] || (training && output_mask[0]) || writes_dz;
  const at::TensorOptions options = stats.mean.options();
  at::Tensor sum_dy = wants_sums ? per_channel_result(in, options) : at::Tensor();
  at::Tensor sum_dy_xmu = wants_sums ? per_channel_result(in, options) : at::Tensor();
  std::optional<ResultBuffer> grad_input, grad_residual;
  if (output_mask[0])
    grad_input.emplace(empty_result(input, in.plan, ResultKind::kGradient), in.dense);
  if (writes_dz)
    grad_residual.emplace(empty_result(input, in.plan, ResultKind::kGradient), in.dense);
  if (input.numel() > 0) {
    at::Tensor no_tensor;
    kernels().backward(align_to(grad_output, in.dense),
                       act_output.defined() ? align_to(act_output, in.dense) : at::Tensor(), act,
                       in.dense.tensor, in.plan, training, stats.mean, stats.invstd,
                       channel_param(weight, in.plan.view.channels, options, 1.0),
                       channel_param(bias, in.plan.view.channels, options, 0.0), sum_dy, sum_dy_xmu,
                       grad_residual ? grad_residual->buffer : no_tensor,
                       grad_input ? grad_input->buffer : no_tensor);
  }
  const auto [grad_weight, grad_bias] =
      param_grads(sum_dy, sum_dy_xmu, stats.invstd, input, weight, output_mask[1], output_mask[2]);
  return {grad_input ? grad_input->finish() : at::Tensor(), grad_weight, grad_bias,
          output_mask[3] ? grad_residual->finish() : at::Tensor()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    CUSTOM_BN_BATCH_NORM_FORWARD_PARAMS) {
  return forward("custom_bn::batch_norm_forward", input, weight, bias, running_mean, running_var,
                 num_batches_tracked, training, momentum, eps, std::nullopt, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_forward(
    CUSTOM_BN_BATCH_NORM_RELU_FORWARD_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_forward";
  const Activation act = checked_activation(op, CUSTOM_BN_ACTIVATION_ARGS);
  check_activation_residual(op, act, has(residual));
  return forward(op, input, weight, bias, running_mean, running_var, num_batches_tracked, training,
                 momentum, eps, act, residual);
}

at::Tensor batch_norm_eval(CUSTOM_BN_BATCH_NORM_EVAL_PARAMS) {
  const char* op = "custom_bn::batch_norm_eval";
  const Activation act = checked_activation(op, CUSTOM_BN_ACTIVATION_ARGS);
  check_activation_residual(op, act, has(residual));
  check_batch_norm_eval(op, input, weight, bias, running_mean, running_var, relu, residual);
  return eval_output(input, weight, bias, running_mean, running_var, eps,
                     relu ? std::optional(act) : std::nullopt, residual);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    CUSTOM_BN_BATCH_NORM_BACKWARD_PARAMS) {
  check_batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                            save_invstd, training);
  const auto [grad_input, grad_weight, grad_bias, no_grad_residual] =
      backward("batch_norm_backward", grad_output, at::Tensor(), Activation{}, input, weight,
               running_mean, running_var, save_mean, save_invstd, training, eps,
               {output_mask[0], output_mask[1], output_mask[2], false});
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward(
    CUSTOM_BN_BATCH_NORM_RELU_BACKWARD_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_backward";
  const Activation act = checked_activation(op, CUSTOM_BN_ACTIVATION_ARGS);
  check_batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                            save_invstd, training, op, output, bias);
  return backward("batch_norm_relu_backward", grad_output, output, act, input, weight, running_mean,
                  running_var, save_mean, save_invstd, training, eps, output_mask, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_stats(CUSTOM_BN_BATCH_NORM_STATS_PARAMS) {
  check_input("custom_bn::batch_norm_stats", input);
  const auto [mean, m2] = channel_stats(plan_input(input, "batch_norm_stats"));
  at::Tensor count = at::full({1}, static_cast<double>(values_per_channel(input)), mean.options());
  return {count, mean, m2};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_gather_stats_with_counts(
    CUSTOM_BN_BATCH_NORM_GATHER_STATS_WITH_COUNTS_PARAMS) {
  check_gather_stats(mean, m2, counts, running_mean, running_var, num_batches_tracked, momentum);
  const MergedStats merged = merge_stats(mean, m2, counts);
  at::Tensor invstd = invstd_from_m2(merged.m2, merged.count, eps);
  update_running_stats(merged.mean, merged.m2, merged.count, running_mean, running_var,
                       num_batches_tracked, momentum);
  return {merged.mean, invstd};
}

at::Tensor batch_norm_elemt(CUSTOM_BN_BATCH_NORM_ELEMT_PARAMS) {
  check_elemt("custom_bn::batch_norm_elemt", input, weight, bias, mean, invstd);
  return normalize(input, plan_input(input, "batch_norm_elemt"),
                   {mean.reshape({-1}).contiguous(), invstd.reshape({-1}).contiguous()}, weight,
                   bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce(
    CUSTOM_BN_BATCH_NORM_BACKWARD_REDUCE_PARAMS) {
  const char* op = "custom_bn::batch_norm_backward_reduce";
  check_elemt(op, input, weight, std::nullopt, mean, invstd);
  check_grad_output(op, grad_output, input);
  const auto [sum_dy, sum_dy_xmu] =
      grad_sums(grad_output, plan_input(input, "batch_norm_backward_reduce"),
                mean.reshape({-1}).contiguous());
  const auto [grad_weight, grad_bias] =
      param_grads(sum_dy, sum_dy_xmu, invstd.contiguous(), input, weight, weight_g, bias_g);
  // grad_bias may be sum_dy itself; both are outputs.
  return {input_g ? sum_dy : at::Tensor(), input_g ? sum_dy_xmu : at::Tensor(), grad_weight,
          input_g && grad_bias.is_same(sum_dy) ? grad_bias.clone() : grad_bias};
}

at::Tensor batch_norm_backward_elemt(CUSTOM_BN_BATCH_NORM_BACKWARD_ELEMT_PARAMS) {
  check_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count);
  const double total = count.sum().item<double>();
  return grad_input_from_sums(
      /*training=*/true, grad_output, input, plan_input(input, "batch_norm_backward_elemt"),
      {mean.reshape({-1}).contiguous(), invstd.reshape({-1}).contiguous()}, weight,
      sum_dy.reshape({-1}).contiguous(), sum_dy_xmu.reshape({-1}).contiguous(), total);
}

TORCH_LIBRARY_IMPL(custom_bn, CPU, m) { CUSTOM_BN_REGISTER_BACKEND_OPS(m); }

}  // namespace custom_bn::cpu
