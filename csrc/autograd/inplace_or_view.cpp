// ADInplaceOrView kernels of the ops that write their arguments: bump the version counters of
// what they wrote, as ATen does for its in-place ops, so autograd notices stale saved tensors.
#include "checks.h"
#include "op_params.h"

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
    CUSTOM_BN_BATCH_NORM_FORWARD_PARAMS) {
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
    CUSTOM_BN_BATCH_NORM_RELU_FORWARD_PARAMS) {
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    return batch_norm_relu_forward(input, weight, bias, running_mean, running_var,
                                   num_batches_tracked, residual, training, momentum, eps,
                                   CUSTOM_BN_ACTIVATION_ARGS);
  }();
  if (training && has(running_mean)) {
    bump_versions({&running_mean, &running_var, &num_batches_tracked});
  }
  return result;
}

// In-place activated batch norm writes its input, always.
std::tuple<at::Tensor, at::Tensor, at::Tensor> in_place_forward_inplace_or_view(
    CUSTOM_BN_BATCH_NORM_RELU_FORWARD_INPLACE_PARAMS) {
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    return batch_norm_relu_forward_(input, weight, bias, running_mean, running_var,
                                    num_batches_tracked, residual, training, momentum, eps,
                                    CUSTOM_BN_INPLACE_ACTIVATION_ARGS, keep_input);
  }();
  torch::autograd::impl::bump_version(input);
  if (training && has(running_mean)) {
    bump_versions({&running_mean, &running_var, &num_batches_tracked});
  }
  return result;
}

std::tuple<at::Tensor, at::Tensor> gather_stats_inplace_or_view(
    CUSTOM_BN_BATCH_NORM_GATHER_STATS_WITH_COUNTS_PARAMS) {
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
  m.impl("batch_norm_relu_forward_", TORCH_FN(in_place_forward_inplace_or_view));
  m.impl("batch_norm_gather_stats_with_counts", TORCH_FN(gather_stats_inplace_or_view));
}

}  // namespace custom_bn
