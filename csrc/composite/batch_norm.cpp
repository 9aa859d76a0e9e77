// batch_norm and batch_norm_relu, for every backend and for autograd at once: the outputs of
// batch_norm_forward and batch_norm_relu_forward, or in evaluation mode of the non-mutating
// batch_norm_eval, whose Autograd kernels (csrc/autograd/) make them differentiable. Being
// compositions, they are differentiable at every level of a torch.func transform through
// those kernels, and torch.export sees no state written by an eval graph.
#include "checks.h"
#include "op_params.h"

#include <torch/library.h>

namespace custom_bn {
namespace {

// Evaluation with running statistics writes nothing: num_batches_tracked is only checked.
bool reads_running_stats_only(const char* op, const at::Tensor& input, bool training,
                              const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var,
                              const std::optional<at::Tensor>& num_batches_tracked,
                              std::optional<double> momentum) {
  if (training || !has(running_mean) || !has(running_var)) return false;
  check_running_update(op, input, num_batches_tracked, momentum, /*updates_running_stats=*/false);
  return true;
}

at::Tensor batch_norm_composite(CUSTOM_BN_BATCH_NORM_PARAMS) {
  if (reads_running_stats_only("custom_bn::batch_norm", input, training, running_mean, running_var,
                               num_batches_tracked, momentum)) {
    return batch_norm_eval(input, weight, bias, *running_mean, *running_var, eps, /*relu=*/false,
                           std::nullopt);
  }
  return std::get<0>(batch_norm_forward(input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, training, momentum, eps));
}

at::Tensor batch_norm_relu_composite(CUSTOM_BN_BATCH_NORM_RELU_PARAMS) {
  if (reads_running_stats_only("custom_bn::batch_norm_relu", input, training, running_mean,
                               running_var, num_batches_tracked, momentum)) {
    return batch_norm_eval(input, weight, bias, *running_mean, *running_var, eps, /*relu=*/true,
                           residual);
  }
  return std::get<0>(batch_norm_relu_forward(input, weight, bias, running_mean, running_var,
                                             num_batches_tracked, residual, training, momentum,
                                             eps));
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, CompositeImplicitAutograd, m) {
  m.impl("batch_norm", TORCH_FN(batch_norm_composite));
  m.impl("batch_norm_relu", TORCH_FN(batch_norm_relu_composite));
}

}  // namespace custom_bn
