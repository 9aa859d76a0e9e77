// The CUDA kernels of every op: checks, a device guard, then the passes of
// csrc/cuda/launch.cuh over the input in a layout they walk. The same kernel code runs on the
// CPU in test/simt.
#include "backends.h"
#include "channel_stats.h"
#include "checks.h"
#include "cuda/launch.cuh"
#include "layout.h"

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace custom_bn::cuda {
namespace {

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
  const c10::cuda::CUDAGuard guard(input.device());
  const DenseTensor dense = make_dense(input);
  const int64_t channels = input.size(1);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "forward", [&] {
    with_param_type<scalar_t>(weight, running_mean, [&](auto param) {
      using param_t = decltype(param);
      if (!training) {
        const ChannelStats stats = eval_stats(input, running_mean, running_var, eps, eval_invstd);
        result = {normalize<scalar_t, param_t>(input, dense, stats.mean, stats.invstd, weight, bias,
                                               act, residual),
                  at::empty({0}, stat_options(input)), at::empty({0}, stat_options(input))};
        return;
      }
      at::Tensor mean = at::zeros({channels}, stat_options(input));
      at::Tensor m2 = at::zeros({channels}, stat_options(input));
      at::Tensor invstd = at::zeros({channels}, stat_options(input));
      const bool updates = has(running_mean);
      // Counted on the device; the statistics kernel reads it for momentum = None.
      if (updates && has(num_batches_tracked)) num_batches_tracked->add_(1);
      RunningStats running(updates ? running_mean : std::nullopt, running_var);
      if (input.numel() > 0) {
        collect_stats<scalar_t, param_t>(dense, mean, m2, invstd, eps,
                                         running.update<param_t>(num_batches_tracked, momentum));
      }
      running.finish();
      result = {
          normalize<scalar_t, param_t>(input, dense, mean, invstd, weight, bias, act, residual),
          mean, invstd};
    });
  });
  return result;
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
  return std::get<0>(forward(op, input, weight, bias, running_mean, running_var, std::nullopt,
                             /*training=*/false, std::nullopt, eps,
                             relu ? std::optional(act) : std::nullopt, residual));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    CUSTOM_BN_BATCH_NORM_BACKWARD_PARAMS) {
  check_batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                            save_invstd, training);
  const c10::cuda::CUDAGuard guard(input.device());
  const ChannelStats stats = backward_stats(input, running_mean, running_var, save_mean,
                                            save_invstd, training, eps, eval_invstd);
  const at::Tensor& mean = stats.mean;
  const at::Tensor& invstd = stats.invstd;
  const DenseTensor dense = make_dense(input);
  at::Tensor grad_in, grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_backward", [&] {
        with_param_type<scalar_t>(weight, running_mean, [&](auto param) {
          using param_t = decltype(param);
          at::Tensor sum_dy, sum_dy_xmu;
          if (output_mask[1] || output_mask[2] || (training && output_mask[0])) {
            std::tie(sum_dy, sum_dy_xmu) = grad_sums<scalar_t>(grad_output, dense, mean);
          }
          if (output_mask[0]) {
            grad_in = grad_input<scalar_t, param_t>(training, grad_output, input, dense, mean,
                                                    invstd, weight, sum_dy, sum_dy_xmu,
                                                    static_cast<double>(values_per_channel(input)));
          }
          std::tie(grad_weight, grad_bias) = param_grads(sum_dy, sum_dy_xmu, invstd, input, weight,
                                                         output_mask[1], output_mask[2]);
        });
      });
  return {grad_in, grad_weight, grad_bias};
}

// The activation's backward fused into the reduction pass (it writes dz), then batch_norm's
// input gradient of dz.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward(
    CUSTOM_BN_BATCH_NORM_RELU_BACKWARD_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_backward";
  const Activation act = checked_activation(op, CUSTOM_BN_ACTIVATION_ARGS);
  check_batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                            save_invstd, training, op, output, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  const ChannelStats stats = backward_stats(input, running_mean, running_var, save_mean,
                                            save_invstd, training, eps, eval_invstd);
  const at::Tensor& mean = stats.mean;
  const at::Tensor& invstd = stats.invstd;
  const DenseTensor dense = make_dense(input);
  at::Tensor grad_masked = at::empty_like(dense.tensor);
  // A smooth activation's pre-activation, recomputed as the forward computed it.
  at::Tensor alpha, beta;
  if (act.smooth()) {
    alpha = has(weight) ? invstd * weight->to(invstd.scalar_type()) : invstd;
    beta = has(bias) ? bias->to(invstd.scalar_type()).contiguous() : at::zeros_like(invstd);
  }
  at::Tensor grad_in, grad_weight, grad_bias, grad_residual;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_relu_backward", [&] {
        with_param_type<scalar_t>(weight, running_mean, [&](auto param) {
          using param_t = decltype(param);
          const auto [sum_dy, sum_dy_xmu] = grad_sums<scalar_t>(
              grad_output, dense, mean, align_to(output, dense), act, &grad_masked, alpha, beta);
          if (output_mask[0]) {
            grad_in = grad_input<scalar_t, param_t>(training, grad_masked, input, dense, mean,
                                                    invstd, weight, sum_dy, sum_dy_xmu,
                                                    static_cast<double>(values_per_channel(input)));
          }
          std::tie(grad_weight, grad_bias) = param_grads(sum_dy, sum_dy_xmu, invstd, input, weight,
                                                         output_mask[1], output_mask[2]);
        });
      });
  if (output_mask[3]) {
    grad_residual = empty_result_like(input, ResultKind::kGradient);
    if (same_offsets(grad_residual, grad_masked)) {
      grad_residual = grad_masked;
    } else {
      grad_residual.copy_(grad_masked);
    }
  }
  return {grad_in, grad_weight, grad_bias, grad_residual};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_stats(CUSTOM_BN_BATCH_NORM_STATS_PARAMS) {
  check_input("custom_bn::batch_norm_stats", input);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t channels = input.size(1);
  at::Tensor mean = at::zeros({channels}, stat_options(input));
  at::Tensor m2 = at::zeros({channels}, stat_options(input));
  at::Tensor invstd = at::zeros({channels}, stat_options(input));
  if (input.numel() > 0) {
    const DenseTensor dense = make_dense(input);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_stats",
        [&] { collect_stats<scalar_t, scalar_t>(dense, mean, m2, invstd, 0.0, {}); });
  }
  return {at::full({1}, static_cast<double>(values_per_channel(input)), stat_options(input)), mean,
          m2};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_gather_stats_with_counts(
    CUSTOM_BN_BATCH_NORM_GATHER_STATS_WITH_COUNTS_PARAMS) {
  check_gather_stats(mean, m2, counts, running_mean, running_var, num_batches_tracked, momentum);
  const c10::cuda::CUDAGuard guard(mean.device());
  const int64_t ranks = mean.size(0), channels = mean.size(1);
  const at::Tensor means = mean.contiguous(), m2s = m2.contiguous();
  const at::Tensor rank_counts = counts.reshape({ranks}).to(mean.scalar_type()).contiguous();
  at::Tensor out_mean = at::empty({channels}, mean.options());
  at::Tensor out_invstd = at::empty({channels}, mean.options());
  if (has(running_mean) && has(num_batches_tracked)) num_batches_tracked->add_(1);
  RunningStats running(running_mean, running_var);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "batch_norm_gather_stats_with_counts", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf,
        has(running_mean) ? running_mean->scalar_type() : mean.scalar_type(), "running", [&] {
          using param_t = scalar_t;
          merge_rank_stats_kernel<acc_t, param_t>
              <<<elementwise_blocks(channels), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                  means.const_data_ptr<acc_t>(), m2s.const_data_ptr<acc_t>(),
                  rank_counts.const_data_ptr<acc_t>(), ranks, channels,
                  out_mean.mutable_data_ptr<acc_t>(), out_invstd.mutable_data_ptr<acc_t>(), eps,
                  running.update<param_t>(num_batches_tracked, momentum));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  running.finish();
  return {out_mean, out_invstd};
}

at::Tensor batch_norm_elemt(CUSTOM_BN_BATCH_NORM_ELEMT_PARAMS) {
  check_elemt("custom_bn::batch_norm_elemt", input, weight, bias, mean, invstd);
  const c10::cuda::CUDAGuard guard(input.device());
  const DenseTensor dense = make_dense(input);
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_elemt", [&] {
        with_param_type<scalar_t>(weight, bias, [&](auto param) {
          result =
              normalize<scalar_t, decltype(param)>(input, dense, mean.reshape({-1}).contiguous(),
                                                   invstd.reshape({-1}).contiguous(), weight, bias);
        });
      });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce(
    CUSTOM_BN_BATCH_NORM_BACKWARD_REDUCE_PARAMS) {
  const char* op = "custom_bn::batch_norm_backward_reduce";
  check_elemt(op, input, weight, std::nullopt, mean, invstd);
  check_grad_output(op, grad_output, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const DenseTensor dense = make_dense(input);
  at::Tensor sum_dy, sum_dy_xmu;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_backward_reduce", [&] {
        std::tie(sum_dy, sum_dy_xmu) =
            grad_sums<scalar_t>(grad_output, dense, mean.reshape({-1}).contiguous());
      });
  const auto [grad_weight, grad_bias] =
      param_grads(sum_dy, sum_dy_xmu, invstd, input, weight, weight_g, bias_g);
  // grad_bias may be sum_dy itself; both are outputs.
  return {input_g ? sum_dy : at::Tensor(), input_g ? sum_dy_xmu : at::Tensor(), grad_weight,
          input_g && grad_bias.is_same(sum_dy) ? grad_bias.clone() : grad_bias};
}

at::Tensor batch_norm_backward_elemt(CUSTOM_BN_BATCH_NORM_BACKWARD_ELEMT_PARAMS) {
  check_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count);
  const c10::cuda::CUDAGuard guard(input.device());
  const DenseTensor dense = make_dense(input);
  // The total count is needed on the host for the launch arguments: one small sync.
  const double total = count.sum().item<double>();
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_backward_elemt", [&] {
        with_param_type<scalar_t>(weight, std::nullopt, [&](auto param) {
          result = grad_input<scalar_t, decltype(param)>(
              true, grad_output, input, dense, mean.reshape({-1}).contiguous(),
              invstd.reshape({-1}).contiguous(), weight, sum_dy.reshape({-1}).contiguous(),
              sum_dy_xmu.reshape({-1}).contiguous(), total);
        });
      });
  return result;
}

TORCH_LIBRARY_IMPL(custom_bn, CUDA, m) { CUSTOM_BN_REGISTER_BACKEND_OPS(m); }

}  // namespace custom_bn::cuda
