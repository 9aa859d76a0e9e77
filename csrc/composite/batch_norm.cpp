// batch_norm below autograd, for every backend (CPU, CUDA, Meta) at once: the output of
// batch_norm_forward. Its Autograd kernel is csrc/autograd/batch_norm.cpp.
#include <custom_bn/ops.h>

#include <torch/library.h>

namespace custom_bn {
namespace {

at::Tensor batch_norm_without_autograd(const at::Tensor& input,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& running_mean,
                                       const std::optional<at::Tensor>& running_var, bool training,
                                       std::optional<double> momentum, double eps,
                                       const std::optional<at::Tensor>& num_batches_tracked) {
  return std::get<0>(batch_norm_forward(input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, training, momentum, eps));
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, CompositeExplicitAutograd, m) {
  m.impl("batch_norm", TORCH_FN(batch_norm_without_autograd));
}

}  // namespace custom_bn
