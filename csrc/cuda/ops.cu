// The CUDA kernels of every op: the device code of csrc/cuda/kernels/batch_norm.cuh,
// launched on the current stream under a device guard, each launch checked. The same
// kernel code runs on the CPU in test/simt.
#include "backends.h"
#include "checks.h"
#include "cpu/layout.h"  // make_dense and align_to: device-agnostic tensor plumbing
#include "cuda/kernels/batch_norm.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace custom_bn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSlices = 64;

template <typename Acc, typename acc_t, typename index_t>
__global__ void reduce_channels_kernel(Acc acc, kernels::DeviceView view, acc_t* partials,
                                       int* arrivals) {
  kernels::reduce_channels<Acc, acc_t, index_t>(acc, view, partials, arrivals);
}

template <typename scalar_t, typename acc_t, typename param_t, typename index_t>
__global__ void normalize_kernel(const scalar_t* x, scalar_t* y, kernels::DeviceView view,
                                 const acc_t* mean, const acc_t* invstd, const param_t* weight,
                                 const param_t* bias, bool apply_relu, const scalar_t* residual) {
  kernels::normalize_elements<scalar_t, acc_t, param_t, index_t>(x, y, view, mean, invstd, weight,
                                                                 bias, apply_relu, residual);
}

template <typename scalar_t, typename acc_t, typename param_t, typename index_t>
__global__ void grad_input_kernel(const scalar_t* grad_output, const scalar_t* x,
                                  scalar_t* grad_input, kernels::DeviceView view, const acc_t* mean,
                                  const acc_t* invstd, const param_t* weight, const acc_t* sum_dy,
                                  const acc_t* sum_dy_xmu, acc_t count, bool training) {
  kernels::grad_input_elements<scalar_t, acc_t, param_t, index_t>(
      grad_output, x, grad_input, view, mean, invstd, weight, sum_dy, sum_dy_xmu, count, training);
}

template <typename acc_t, typename param_t>
__global__ void merge_rank_stats_kernel(const acc_t* means, const acc_t* m2s, const acc_t* counts,
                                        int64_t ranks, int64_t channels, acc_t* mean, acc_t* invstd,
                                        double eps, kernels::RunningUpdate<param_t> running) {
  kernels::merge_rank_stats<acc_t, param_t>(means, m2s, counts, ranks, channels, mean, invstd, eps,
                                            running);
}

kernels::DeviceView device_view(const cpu::ChannelView& v) {
  return {v.layout == cpu::Layout::kChannelsLast, v.outer, v.channels, v.inner};
}

at::TensorOptions stat_options(const at::Tensor& input) {
  return input.options().dtype(stat_dtype(input.scalar_type()));
}

bool needs_64bit_index(const at::Tensor& t) {
  return t.numel() > std::numeric_limits<int32_t>::max();
}

int64_t values_per_channel(const at::Tensor& input) {
  return input.size(1) == 0 ? 0 : input.numel() / input.size(1);
}

int elementwise_blocks(int64_t numel) {
  return static_cast<int>(std::clamp<int64_t>((numel + kThreads - 1) / kThreads, 1, 65535));
}

// Calls f(param_t{}) with the parameter type: float with bf16/fp16 input and float32
// parameters, the input's type otherwise.
template <typename scalar_t, typename F>
void with_param_type(const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b,
                     F&& f) {
  const std::optional<at::Tensor>& p = has(a) ? a : b;
  if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) {
    if (has(p) && p->scalar_type() == at::kFloat) return f(float{});
  }
  f(scalar_t{});
}

template <typename param_t>
const param_t* data_or_null(const std::optional<at::Tensor>& t) {
  return has(t) ? t->const_data_ptr<param_t>() : nullptr;
}

// Runs the per-channel reduction `acc` over the input laid out as `dense`.
template <typename Acc, typename acc_t, typename index_t>
void launch_reduction(const Acc& acc, const cpu::DenseTensor& dense) {
  const kernels::DeviceView view = device_view(dense.view);
  const int64_t per_channel = view.outer * view.inner;
  const int64_t groups =
      view.channels_last ? (view.channels + kThreads - 1) / kThreads : view.channels;
  const int64_t slices = std::clamp<int64_t>(
      view.channels_last ? per_channel / 32 : per_channel / (4 * kThreads), 1, kMaxSlices);
  const auto options = dense.tensor.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor partials = at::empty({view.channels * slices * Acc::kFields}, options);
  at::Tensor arrivals = at::zeros({groups}, dense.tensor.options().dtype(at::kInt));
  TORCH_CHECK(groups <= 65535, "custom_bn: too many channels for one launch: ", view.channels);
  const dim3 grid(static_cast<unsigned>(slices), static_cast<unsigned>(groups));
  reduce_channels_kernel<Acc, acc_t, index_t>
      <<<grid, kThreads, kernels::reduce_shared_bytes<Acc, acc_t>(kThreads),
         at::cuda::getCurrentCUDAStream()>>>(acc, view, partials.mutable_data_ptr<acc_t>(),
                                             arrivals.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Per-channel (mean, m2, invstd) of `dense`, with the running update fused in.
template <typename scalar_t, typename param_t>
void collect_stats(const cpu::DenseTensor& dense, at::Tensor& mean, at::Tensor& m2,
                   at::Tensor& invstd, double eps, const kernels::RunningUpdate<param_t>& running) {
  using acc_t = at::opmath_type<scalar_t>;
  const kernels::StatsAccumulator<scalar_t, acc_t, param_t> acc{
      dense.tensor.const_data_ptr<scalar_t>(),
      mean.mutable_data_ptr<acc_t>(),
      m2.mutable_data_ptr<acc_t>(),
      invstd.mutable_data_ptr<acc_t>(),
      eps,
      running};
  if (needs_64bit_index(dense.tensor)) {
    launch_reduction<decltype(acc), acc_t, int64_t>(acc, dense);
  } else {
    launch_reduction<decltype(acc), acc_t, int32_t>(acc, dense);
  }
}

// The output pass; with apply_relu, relu(normalized + residual) (residual optional).
template <typename scalar_t, typename param_t>
at::Tensor normalize(const at::Tensor& input, const cpu::DenseTensor& dense, const at::Tensor& mean,
                     const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, bool apply_relu = false,
                     const std::optional<at::Tensor>& residual = std::nullopt) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor result = at::empty_like(input, input.suggest_memory_format());
  if (input.numel() == 0) return result;
  at::Tensor out =
      result.strides() == dense.tensor.strides() ? result : at::empty_like(dense.tensor);
  const at::Tensor aligned_residual =
      has(residual) ? cpu::align_to(*residual, dense) : at::Tensor();
  const kernels::DeviceView view = device_view(dense.view);
  const auto launch = [&](auto index) {
    using index_t = decltype(index);
    normalize_kernel<scalar_t, acc_t, param_t, index_t>
        <<<elementwise_blocks(input.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            dense.tensor.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), view,
            mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
            data_or_null<param_t>(weight), data_or_null<param_t>(bias), apply_relu,
            aligned_residual.defined() ? aligned_residual.const_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  needs_64bit_index(input) ? launch(int64_t{}) : launch(int32_t{});
  if (!out.is_same(result)) result.copy_(out);
  return result;
}

// (sum_dy, sum_dy_xmu). Given the output of batch_norm_relu (aligned to dense), dy is
// masked by ReLU's gradient first, and the masked dy written to grad_masked.
template <typename scalar_t>
std::pair<at::Tensor, at::Tensor> grad_sums(const at::Tensor& grad_output,
                                            const cpu::DenseTensor& dense, const at::Tensor& mean,
                                            const at::Tensor& relu_output = {},
                                            at::Tensor* grad_masked = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = dense.tensor.size(1);
  at::Tensor sum_dy = at::zeros({channels}, mean.options());
  at::Tensor sum_dy_xmu = at::zeros({channels}, mean.options());
  if (dense.tensor.numel() == 0) return {sum_dy, sum_dy_xmu};
  const at::Tensor dy = cpu::align_to(grad_output, dense);
  const kernels::GradAccumulator<scalar_t, acc_t> acc{
      dy.const_data_ptr<scalar_t>(),
      dense.tensor.const_data_ptr<scalar_t>(),
      mean.const_data_ptr<acc_t>(),
      sum_dy.mutable_data_ptr<acc_t>(),
      sum_dy_xmu.mutable_data_ptr<acc_t>(),
      relu_output.defined() ? relu_output.const_data_ptr<scalar_t>() : nullptr,
      grad_masked != nullptr ? grad_masked->mutable_data_ptr<scalar_t>() : nullptr};
  if (needs_64bit_index(dense.tensor)) {
    launch_reduction<decltype(acc), acc_t, int64_t>(acc, dense);
  } else {
    launch_reduction<decltype(acc), acc_t, int32_t>(acc, dense);
  }
  return {sum_dy, sum_dy_xmu};
}

template <typename scalar_t, typename param_t>
at::Tensor grad_input(bool training, const at::Tensor& grad_output, const at::Tensor& input,
                      const cpu::DenseTensor& dense, const at::Tensor& mean,
                      const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                      const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, double count) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor result = at::empty_like(input, input.suggest_memory_format());
  if (input.numel() == 0) return result;
  at::Tensor out =
      result.strides() == dense.tensor.strides() ? result : at::empty_like(dense.tensor);
  const at::Tensor dy = cpu::align_to(grad_output, dense);
  const kernels::DeviceView view = device_view(dense.view);
  const auto launch = [&](auto index) {
    using index_t = decltype(index);
    grad_input_kernel<scalar_t, acc_t, param_t, index_t>
        <<<elementwise_blocks(input.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            dy.const_data_ptr<scalar_t>(), dense.tensor.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), view, mean.const_data_ptr<acc_t>(),
            invstd.const_data_ptr<acc_t>(), data_or_null<param_t>(weight),
            training ? sum_dy.const_data_ptr<acc_t>() : nullptr,
            training ? sum_dy_xmu.const_data_ptr<acc_t>() : nullptr, static_cast<acc_t>(count),
            training);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  needs_64bit_index(input) ? launch(int64_t{}) : launch(int32_t{});
  if (!out.is_same(result)) result.copy_(out);
  return result;
}

// Running stats as contiguous tensors of their own dtype: the tensors themselves, or copies
// written back by finish() (views with strides, say).
struct RunningStats {
  std::optional<at::Tensor> mean, var;
  at::Tensor mean_work, var_work;

  RunningStats(const std::optional<at::Tensor>& m, const std::optional<at::Tensor>& v)
      : mean(m), var(v) {
    if (has(m)) {
      mean_work = m->is_contiguous() ? *m : m->contiguous();
      var_work = v->is_contiguous() ? *v : v->contiguous();
    }
  }
  template <typename param_t>
  kernels::RunningUpdate<param_t> update(const std::optional<at::Tensor>& nbt,
                                         std::optional<double> momentum) {
    if (!has(mean)) return {};
    return {mean_work.mutable_data_ptr<param_t>(), var_work.mutable_data_ptr<param_t>(),
            has(nbt) ? nbt->const_data_ptr<int64_t>() : nullptr, momentum.value_or(-1.0)};
  }
  void finish() {
    if (!has(mean)) return;
    if (!mean_work.is_same(*mean)) mean->copy_(mean_work);
    if (!var_work.is_same(*var)) var->copy_(var_work);
  }
};

// (mean, invstd) the backward uses: saved (training) or from the running stats (eval).
std::pair<at::Tensor, at::Tensor> backward_stats(const at::Tensor& input,
                                                 const std::optional<at::Tensor>& running_mean,
                                                 const std::optional<at::Tensor>& running_var,
                                                 const at::Tensor& save_mean,
                                                 const at::Tensor& save_invstd, bool training,
                                                 double eps) {
  const int64_t channels = input.size(1);
  const at::ScalarType stat = stat_dtype(input.scalar_type());
  if (training) {
    return {save_mean.reshape({channels}).contiguous(),
            save_invstd.reshape({channels}).contiguous()};
  }
  return {running_mean->reshape({channels}).to(stat).contiguous(),
          (running_var->reshape({channels}).to(stat) + eps).rsqrt()};
}

// The forward of batch_norm_forward and (apply_relu) batch_norm_relu_forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, bool apply_relu,
    const std::optional<at::Tensor>& residual) {
  check_batch_norm_forward(op, input, weight, bias, running_mean, running_var, num_batches_tracked,
                           training, momentum, residual);
  const c10::cuda::CUDAGuard guard(input.device());
  const cpu::DenseTensor dense = cpu::make_dense(input);
  const int64_t channels = input.size(1);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "forward", [&] {
    with_param_type<scalar_t>(weight, running_mean, [&](auto param) {
      using param_t = decltype(param);
      if (!training) {
        const at::Tensor mean =
            running_mean->reshape({channels}).to(stat_dtype(input.scalar_type())).contiguous();
        const at::Tensor invstd =
            (running_var->reshape({channels}).to(mean.scalar_type()) + eps).rsqrt();
        result = {normalize<scalar_t, param_t>(input, dense, mean, invstd, weight, bias, apply_relu,
                                               residual),
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
      result = {normalize<scalar_t, param_t>(input, dense, mean, invstd, weight, bias, apply_relu,
                                             residual),
                mean, invstd};
    });
  });
  return result;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps) {
  return forward("custom_bn::batch_norm_forward", input, weight, bias, running_mean, running_var,
                 num_batches_tracked, training, momentum, eps, /*apply_relu=*/false, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, const std::optional<at::Tensor>& residual,
    bool training, std::optional<double> momentum, double eps) {
  return forward("custom_bn::batch_norm_relu_forward", input, weight, bias, running_mean,
                 running_var, num_batches_tracked, training, momentum, eps, /*apply_relu=*/true,
                 residual);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, double eps,
    std::array<bool, 3> output_mask) {
  check_batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                            save_invstd, training);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor mean, invstd;
  std::tie(mean, invstd) =
      backward_stats(input, running_mean, running_var, save_mean, save_invstd, training, eps);
  const cpu::DenseTensor dense = cpu::make_dense(input);
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
          const at::ScalarType param_dtype =
              has(weight) ? weight->scalar_type() : input.scalar_type();
          if (output_mask[1]) grad_weight = (sum_dy_xmu * invstd).to(param_dtype);
          if (output_mask[2]) grad_bias = sum_dy.to(param_dtype, false, /*copy=*/true);
        });
      });
  return {grad_in, grad_weight, grad_bias};
}

// ReLU's backward fused into the reduction pass (it writes the masked dy), then batch_norm's
// input gradient of the masked dy.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, std::array<bool, 4> output_mask) {
  const char* op = "custom_bn::batch_norm_relu_backward";
  check_batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                            save_invstd, training, op, output);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor mean, invstd;
  std::tie(mean, invstd) =
      backward_stats(input, running_mean, running_var, save_mean, save_invstd, training, eps);
  const cpu::DenseTensor dense = cpu::make_dense(input);
  at::Tensor grad_masked = at::empty_like(dense.tensor);
  at::Tensor grad_in, grad_weight, grad_bias, grad_residual;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_relu_backward", [&] {
        with_param_type<scalar_t>(weight, running_mean, [&](auto param) {
          using param_t = decltype(param);
          const auto [sum_dy, sum_dy_xmu] = grad_sums<scalar_t>(
              grad_output, dense, mean, cpu::align_to(output, dense), &grad_masked);
          if (output_mask[0]) {
            grad_in = grad_input<scalar_t, param_t>(training, grad_masked, input, dense, mean,
                                                    invstd, weight, sum_dy, sum_dy_xmu,
                                                    static_cast<double>(values_per_channel(input)));
          }
          const at::ScalarType param_dtype =
              has(weight) ? weight->scalar_type() : input.scalar_type();
          if (output_mask[1]) grad_weight = (sum_dy_xmu * invstd).to(param_dtype);
          if (output_mask[2]) grad_bias = sum_dy.to(param_dtype, false, /*copy=*/true);
        });
      });
  if (output_mask[3]) {
    grad_residual = at::empty_like(input, input.suggest_memory_format());
    if (grad_residual.strides() == grad_masked.strides()) {
      grad_residual = grad_masked;
    } else {
      grad_residual.copy_(grad_masked);
    }
  }
  return {grad_in, grad_weight, grad_bias, grad_residual};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input) {
  check_input("custom_bn::batch_norm_stats", input);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t channels = input.size(1);
  at::Tensor mean = at::zeros({channels}, stat_options(input));
  at::Tensor m2 = at::zeros({channels}, stat_options(input));
  at::Tensor invstd = at::zeros({channels}, stat_options(input));
  if (input.numel() > 0) {
    const cpu::DenseTensor dense = cpu::make_dense(input);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_stats",
        [&] { collect_stats<scalar_t, scalar_t>(dense, mean, m2, invstd, 0.0, {}); });
  }
  return {at::full({1}, static_cast<double>(values_per_channel(input)), stat_options(input)), mean,
          m2};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_gather_stats_with_counts(
    const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& counts,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
    double eps) {
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

at::Tensor batch_norm_elemt(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                            const at::Tensor& invstd) {
  check_elemt("custom_bn::batch_norm_elemt", input, weight, bias, mean, invstd);
  const c10::cuda::CUDAGuard guard(input.device());
  const cpu::DenseTensor dense = cpu::make_dense(input);
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
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool input_g, bool weight_g,
    bool bias_g) {
  const char* op = "custom_bn::batch_norm_backward_reduce";
  check_elemt(op, input, weight, std::nullopt, mean, invstd);
  check_grad_output(op, grad_output, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const cpu::DenseTensor dense = cpu::make_dense(input);
  at::Tensor sum_dy, sum_dy_xmu;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_backward_reduce", [&] {
        std::tie(sum_dy, sum_dy_xmu) =
            grad_sums<scalar_t>(grad_output, dense, mean.reshape({-1}).contiguous());
      });
  const at::ScalarType param_dtype = has(weight) ? weight->scalar_type() : input.scalar_type();
  return {input_g ? sum_dy : at::Tensor(), input_g ? sum_dy_xmu : at::Tensor(),
          weight_g ? (sum_dy_xmu * invstd.reshape({-1})).to(param_dtype) : at::Tensor(),
          bias_g ? sum_dy.to(param_dtype, false, /*copy=*/true) : at::Tensor()};
}

at::Tensor batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                                     const at::Tensor& mean, const at::Tensor& invstd,
                                     const std::optional<at::Tensor>& weight,
                                     const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                     const at::Tensor& count) {
  check_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count);
  const c10::cuda::CUDAGuard guard(input.device());
  const cpu::DenseTensor dense = cpu::make_dense(input);
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
