// ADInplaceOrView kernels of the ops that write their arguments: bump the version counters of
// what they wrote, as ATen does for its in-place ops, so autograd notices stale saved tensors.
#include <custom_bn/ops.h>

#include "checks.h"

#include <torch/autograd.h>
#include <torch/library.h>

namespace custom_bn {
namespace {

void bump_versions(std::initializer_list<const std::optional<at::Tensor>*> written) {
  for (const std::optional<at::Tensor>* t : written) {
    if (has(*t)) torch::autograd::impl::bump_version(**t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_inplace_or_view(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps) {
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    return batch_norm_forward(input, weight, bias, running_mean, running_var, num_batches_tracked,
                              training, momentum, eps);
  }();
  // Eval reads the running stats and writes nothing.
  if (training && has(running_mean)) {
    bump_versions({&running_mean, &running_var, &num_batches_tracked});
  }
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_forward_inplace_or_view(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, const std::optional<at::Tensor>& residual,
    bool training, std::optional<double> momentum, double eps) {
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    return batch_norm_relu_forward(input, weight, bias, running_mean, running_var,
                                   num_batches_tracked, residual, training, momentum, eps);
  }();
  if (training && has(running_mean)) {
    bump_versions({&running_mean, &running_var, &num_batches_tracked});
  }
  return result;
}

std::tuple<at::Tensor, at::Tensor> gather_stats_inplace_or_view(
    const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& counts,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
    double eps) {
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    return batch_norm_gather_stats_with_counts(mean, m2, counts, running_mean, running_var,
                                               num_batches_tracked, momentum, eps);
  }();
  if (has(running_mean)) bump_versions({&running_mean, &running_var, &num_batches_tracked});
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, ADInplaceOrView, m) {
  m.impl("batch_norm_forward", TORCH_FN(batch_norm_forward_inplace_or_view));
  m.impl("batch_norm_relu_forward", TORCH_FN(batch_norm_relu_forward_inplace_or_view));
  m.impl("batch_norm_gather_stats_with_counts", TORCH_FN(gather_stats_inplace_or_view));
}

}  // namespace custom_bn
