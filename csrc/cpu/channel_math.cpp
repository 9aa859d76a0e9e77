// Per-channel loops of the CPU backend over the shared math of batch_norm_math.h.
#include "cpu/channel_math.h"

#include "batch_norm_math.h"
#include "channel_stats.h"
#include "checks.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

namespace custom_bn::cpu {
namespace {

// Typed pointers into contiguous tensors. Take them before a loop over channels: each call
// checks the dtype, out of line, which costs more than the loop body.
template <typename T>
T* data(at::Tensor& t) {
  return t.mutable_data_ptr<T>();
}
template <typename T>
const T* data(const at::Tensor& t) {
  return t.const_data_ptr<T>();
}

at::Tensor empty_like_stat(const at::Tensor& stat) {
  return at::empty({stat.numel()}, stat.options());
}

}  // namespace

at::Tensor channel_param(const std::optional<at::Tensor>& param, int64_t channels,
                         const at::TensorOptions& options, double fill) {
  if (!has(param)) return at::full({channels}, fill, options);
  return channel_vector(*param, channels, options.dtype().toScalarType());
}

// The channel count is read into a local before each loop below: with the bound re-read from
// the tensor, GCC cannot count the iterations and leaves the loop scalar (a square root and
// two divisions per channel, in sequence).
at::Tensor invstd_from_m2(const at::Tensor& m2, double count, double eps) {
  at::Tensor invstd = empty_like_stat(m2);
  fill_invstd_from_m2(m2, count, eps, invstd);
  return invstd;
}

void fill_invstd_from_m2(const at::Tensor& m2, double count, double eps, at::Tensor& invstd) {
  if (count <= 0) {
    invstd.zero_();
    return;
  }
  const int64_t channels = m2.numel();
  AT_DISPATCH_FLOATING_TYPES(m2.scalar_type(), "invstd_from_m2", [&] {
    const scalar_t* m2_data = data<scalar_t>(m2);
    scalar_t* out = data<scalar_t>(invstd);
    const auto n = static_cast<scalar_t>(count);
    for (int64_t c = 0; c < channels; ++c) {
      out[c] = custom_bn::invstd_from_var(m2_data[c] / n, eps);
    }
  });
}

at::Tensor invstd_of_running_var(const at::Tensor& var, const at::TensorOptions& stat_options,
                                 double eps) {
  const at::Tensor var_stat = channel_vector(var, var.numel(), stat_options.dtype().toScalarType());
  at::Tensor invstd = empty_like_stat(var_stat);
  const int64_t channels = var_stat.numel();
  AT_DISPATCH_FLOATING_TYPES(var_stat.scalar_type(), "invstd_of_running_var", [&] {
    const scalar_t* in = data<scalar_t>(var_stat);
    scalar_t* out = data<scalar_t>(invstd);
    for (int64_t c = 0; c < channels; ++c) out[c] = custom_bn::invstd_from_var(in[c], eps);
  });
  return invstd;
}

std::pair<at::Tensor, at::Tensor> affine_coefficients(const at::Tensor& invstd,
                                                      const std::optional<at::Tensor>& weight,
                                                      const std::optional<at::Tensor>& bias) {
  const int64_t channels = invstd.numel();
  const at::Tensor w = channel_param(weight, channels, invstd.options(), 1.0);
  at::Tensor alpha = empty_like_stat(invstd);
  AT_DISPATCH_FLOATING_TYPES(invstd.scalar_type(), "affine_coefficients", [&] {
    const scalar_t* invstd_data = data<scalar_t>(invstd);
    const scalar_t* w_data = data<scalar_t>(w);
    scalar_t* alpha_data = data<scalar_t>(alpha);
    for (int64_t c = 0; c < channels; ++c) alpha_data[c] = invstd_data[c] * w_data[c];
  });
  return {alpha, channel_param(bias, channels, invstd.options(), 0.0)};
}

GradInputCoefficientTensors grad_input_coefficients(bool training, const at::Tensor& invstd,
                                                    const std::optional<at::Tensor>& weight,
                                                    const at::Tensor& sum_dy,
                                                    const at::Tensor& sum_dy_xmu, double count) {
  const int64_t channels = invstd.numel();
  const at::Tensor w = channel_param(weight, channels, invstd.options(), 1.0);
  GradInputCoefficientTensors out{empty_like_stat(invstd), empty_like_stat(invstd),
                                  empty_like_stat(invstd)};
  AT_DISPATCH_FLOATING_TYPES(invstd.scalar_type(), "grad_input_coefficients", [&] {
    const scalar_t* invstd_data = data<scalar_t>(invstd);
    const scalar_t* w_data = data<scalar_t>(w);
    // The sums exist in training only.
    const scalar_t* sum_dy_data = training ? data<scalar_t>(sum_dy) : nullptr;
    const scalar_t* sum_dy_xmu_data = training ? data<scalar_t>(sum_dy_xmu) : nullptr;
    scalar_t* a = data<scalar_t>(out.a);
    scalar_t* b = data<scalar_t>(out.b);
    scalar_t* dy_mean = data<scalar_t>(out.dy_mean);
    for (int64_t c = 0; c < channels; ++c) {
      const auto k = training ? custom_bn::grad_input_coefficients_training(
                                    invstd_data[c], w_data[c], sum_dy_data[c], sum_dy_xmu_data[c],
                                    static_cast<scalar_t>(count))
                              : custom_bn::grad_input_coefficients_eval(invstd_data[c], w_data[c]);
      a[c] = k.a;
      b[c] = k.b;
      dy_mean[c] = k.dy_mean;
    }
  });
  return out;
}

MergedStats merge_stats(const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& counts) {
  const int64_t ranks = mean.size(0), channels = mean.size(1);
  const at::Tensor mean_c = mean.contiguous(), m2_c = m2.contiguous();
  const at::Tensor counts_d = counts.reshape({ranks}).to(at::kDouble).contiguous();
  MergedStats merged{at::empty({channels}, mean.options()), at::empty({channels}, mean.options()),
                     0.0};
  for (int64_t r = 0; r < ranks; ++r) merged.count += data<double>(counts_d)[r];
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "merge_stats", [&] {
    const double* rank_counts = data<double>(counts_d);
    const scalar_t* rank_means = data<scalar_t>(mean_c);
    const scalar_t* rank_m2s = data<scalar_t>(m2_c);
    scalar_t* merged_mean = data<scalar_t>(merged.mean);
    scalar_t* merged_m2 = data<scalar_t>(merged.m2);
    for (int64_t c = 0; c < channels; ++c) {
      WelfordStats<double> total{0, 0, 0};
      for (int64_t r = 0; r < ranks; ++r) {
        total = welford_merge(
            total, WelfordStats<double>{rank_counts[r], double(rank_means[r * channels + c]),
                                        double(rank_m2s[r * channels + c])});
      }
      merged_mean[c] = static_cast<scalar_t>(total.mean);
      merged_m2[c] = static_cast<scalar_t>(total.m2);
    }
  });
  return merged;
}

void update_running_stats(const at::Tensor& batch_mean, const at::Tensor& batch_m2, double count,
                          const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var,
                          const std::optional<at::Tensor>& num_batches_tracked,
                          std::optional<double> momentum) {
  if (!has(running_mean)) return;
  if (has(num_batches_tracked)) num_batches_tracked->add_(1);
  if (count == 0) return;
  const double factor =
      momentum.has_value() ? *momentum : 1.0 / double(num_batches_tracked->item<int64_t>());
  const int64_t channels = batch_mean.numel();
  at::Tensor new_mean = channel_param(running_mean, channels, batch_mean.options(), 0.0);
  at::Tensor new_var = channel_param(running_var, channels, batch_mean.options(), 0.0);
  AT_DISPATCH_FLOATING_TYPES(batch_mean.scalar_type(), "update_running_stats", [&] {
    const scalar_t m = static_cast<scalar_t>(factor);
    const scalar_t* mean_data = data<scalar_t>(batch_mean);
    const scalar_t* m2_data = data<scalar_t>(batch_m2);
    scalar_t* rm = data<scalar_t>(new_mean);
    scalar_t* rv = data<scalar_t>(new_var);
    for (int64_t c = 0; c < channels; ++c) {
      rm[c] = running_update(rm[c], mean_data[c], m);
      rv[c] = running_update(rv[c], unbiased_var(m2_data[c], static_cast<scalar_t>(count)), m);
    }
  });
  // Updated in place when the running stats are contiguous (C,) tensors of the statistics
  // dtype; otherwise copy_ writes through their strides and rounds into their own dtype.
  if (!new_mean.is_same(*running_mean)) running_mean->copy_(new_mean.view(running_mean->sizes()));
  if (!new_var.is_same(*running_var)) running_var->copy_(new_var.view(running_var->sizes()));
}

}  // namespace custom_bn::cpu
