// The launchers of the CUDA backend: the device code of csrc/cuda/kernels/batch_norm.cuh as
// __global__ kernels, each launched on the current stream with its launch checked, and the
// host-side passes built on them (statistics, normalize, backward sums, input gradient).
#pragma once

#include "channel_stats.h"
#include "checks.h"
#include "cuda/kernels/batch_norm.cuh"
#include "layout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <limits>

namespace custom_bn::cuda {

constexpr int kThreads = 256;
constexpr int64_t kMaxSlices = 64;

template <typename Acc, typename acc_t, typename index_t>
__global__ void reduce_channels_kernel(Acc acc, ChannelView view, acc_t* partials, int* arrivals) {
  kernels::reduce_channels<Acc, acc_t, index_t>(acc, view, partials, arrivals);
}

template <typename scalar_t, typename acc_t, typename param_t, typename index_t>
__global__ void normalize_kernel(const scalar_t* x, scalar_t* y, ChannelView view,
                                 const acc_t* mean, const acc_t* invstd, const param_t* weight,
                                 const param_t* bias, bool apply_activation,
                                 ActivationFunction<acc_t> act, const scalar_t* residual) {
  kernels::normalize_elements<scalar_t, acc_t, param_t, index_t>(
      x, y, view, mean, invstd, weight, bias, apply_activation, act, residual);
}

template <typename scalar_t, typename acc_t, typename param_t, typename index_t>
__global__ void grad_input_kernel(const scalar_t* grad_output, const scalar_t* x,
                                  scalar_t* grad_input, ChannelView view, const acc_t* mean,
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

inline bool needs_64bit_index(const at::Tensor& t) {
  return t.numel() > std::numeric_limits<int32_t>::max();
}

inline int elementwise_blocks(int64_t numel) {
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
void launch_reduction(const Acc& acc, const DenseTensor& dense) {
  const ChannelView& view = dense.view;
  const int64_t per_channel = view.outer * view.inner;
  const int64_t groups = view.layout == Layout::kChannelsLast
                             ? (view.channels + kThreads - 1) / kThreads
                             : view.channels;
  const int64_t slices = std::clamp<int64_t>(
      view.layout == Layout::kChannelsLast ? per_channel / 32 : per_channel / (4 * kThreads), 1,
      kMaxSlices);
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
void collect_stats(const DenseTensor& dense, at::Tensor& mean, at::Tensor& m2, at::Tensor& invstd,
                   double eps, const kernels::RunningUpdate<param_t>& running) {
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

// The output pass; with an activation, act(normalized + residual) (residual optional).
template <typename scalar_t, typename param_t>
at::Tensor normalize(const at::Tensor& input, const DenseTensor& dense, const at::Tensor& mean,
                     const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias,
                     const std::optional<Activation>& act = std::nullopt,
                     const std::optional<at::Tensor>& residual = std::nullopt) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor aligned_residual = has(residual) ? align_to(*residual, dense) : at::Tensor();
  const ChannelView& view = dense.view;
  return elementwise_result(
      empty_result_like(input, ResultKind::kOutput), dense, [&](at::Tensor& out) {
        const auto launch = [&](auto index) {
          using index_t = decltype(index);
          normalize_kernel<scalar_t, acc_t, param_t, index_t><<<
              elementwise_blocks(input.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              dense.tensor.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), view,
              mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
              data_or_null<param_t>(weight), data_or_null<param_t>(bias), act.has_value(),
              act ? act->to<acc_t>() : ActivationFunction<acc_t>{},
              aligned_residual.defined() ? aligned_residual.const_data_ptr<scalar_t>() : nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        needs_64bit_index(input) ? launch(int64_t{}) : launch(int32_t{});
      });
}

// (sum_dy, sum_dy_xmu). Given the output of batch_norm_relu (aligned to dense), dy is
// multiplied by the activation's gradient first, and that dz written to grad_masked. A smooth
// act takes its gradient at (x - mean) * alpha + beta instead (per-channel, acc_t).
template <typename scalar_t>
std::pair<at::Tensor, at::Tensor> grad_sums(
    const at::Tensor& grad_output, const DenseTensor& dense, const at::Tensor& mean,
    const at::Tensor& act_output = {}, const Activation& act = {},
    at::Tensor* grad_masked = nullptr, const at::Tensor& alpha = {}, const at::Tensor& beta = {}) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = dense.tensor.size(1);
  at::Tensor sum_dy = at::zeros({channels}, mean.options());
  at::Tensor sum_dy_xmu = at::zeros({channels}, mean.options());
  if (dense.tensor.numel() == 0) return {sum_dy, sum_dy_xmu};
  const at::Tensor dy = align_to(grad_output, dense);
  const kernels::GradAccumulator<scalar_t, acc_t> acc{
      dy.const_data_ptr<scalar_t>(),
      dense.tensor.const_data_ptr<scalar_t>(),
      mean.const_data_ptr<acc_t>(),
      sum_dy.mutable_data_ptr<acc_t>(),
      sum_dy_xmu.mutable_data_ptr<acc_t>(),
      act_output.defined() ? act_output.const_data_ptr<scalar_t>() : nullptr,
      grad_masked != nullptr ? grad_masked->mutable_data_ptr<scalar_t>() : nullptr,
      act.to<acc_t>(),
      act.smooth() ? alpha.const_data_ptr<acc_t>() : nullptr,
      act.smooth() ? beta.const_data_ptr<acc_t>() : nullptr};
  if (needs_64bit_index(dense.tensor)) {
    launch_reduction<decltype(acc), acc_t, int64_t>(acc, dense);
  } else {
    launch_reduction<decltype(acc), acc_t, int32_t>(acc, dense);
  }
  return {sum_dy, sum_dy_xmu};
}

template <typename scalar_t, typename param_t>
at::Tensor grad_input(bool training, const at::Tensor& grad_output, const at::Tensor& input,
                      const DenseTensor& dense, const at::Tensor& mean, const at::Tensor& invstd,
                      const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy,
                      const at::Tensor& sum_dy_xmu, double count) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor dy = align_to(grad_output, dense);
  const ChannelView& view = dense.view;
  return elementwise_result(
      empty_result_like(input, ResultKind::kGradient), dense, [&](at::Tensor& out) {
        const auto launch = [&](auto index) {
          using index_t = decltype(index);
          grad_input_kernel<scalar_t, acc_t, param_t, index_t>
              <<<elementwise_blocks(input.numel()), kThreads, 0,
                 at::cuda::getCurrentCUDAStream()>>>(
                  dy.const_data_ptr<scalar_t>(), dense.tensor.const_data_ptr<scalar_t>(),
                  out.mutable_data_ptr<scalar_t>(), view, mean.const_data_ptr<acc_t>(),
                  invstd.const_data_ptr<acc_t>(), data_or_null<param_t>(weight),
                  training ? sum_dy.const_data_ptr<acc_t>() : nullptr,
                  training ? sum_dy_xmu.const_data_ptr<acc_t>() : nullptr,
                  static_cast<acc_t>(count), training);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        needs_64bit_index(input) ? launch(int64_t{}) : launch(int32_t{});
      });
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

template <typename acc_t>
__global__ void eval_invstd_kernel(const acc_t* var, acc_t* invstd, int64_t channels, double eps) {
  kernels::eval_invstd<acc_t>(var, invstd, channels, eps);
}

// invstd = 1 / sqrt(running_var + eps), by batch_norm_math.h's definition (as the CPU's).
inline at::Tensor eval_invstd(const at::Tensor& running_var, const at::TensorOptions& options,
                              double eps) {
  const at::Tensor var = running_var.reshape({-1}).to(options.dtype()).contiguous();
  at::Tensor invstd = at::empty_like(var);
  if (var.numel() == 0) return invstd;
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "eval_invstd", [&] {
    eval_invstd_kernel<scalar_t>
        <<<elementwise_blocks(var.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            var.const_data_ptr<scalar_t>(), invstd.mutable_data_ptr<scalar_t>(), var.numel(), eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return invstd;
}

}  // namespace custom_bn::cuda
