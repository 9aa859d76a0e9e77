// batch_norm and batch_norm_relu below autograd, for every backend (CPU, CUDA, Meta) at once:
// the outputs of batch_norm_forward and batch_norm_relu_forward. Their Autograd kernels are
// in csrc/autograd/.
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

at::Tensor batch_norm_relu_without_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, std::optional<double> momentum,
    double eps, const std::optional<at::Tensor>& num_batches_tracked,
    const std::optional<at::Tensor>& residual) {
  return std::get<0>(batch_norm_relu_forward(input, weight, bias, running_mean, running_var,
                                             num_batches_tracked, residual, training, momentum,
                                             eps));
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, CompositeExplicitAutograd, m) {
  m.impl("batch_norm", TORCH_FN(batch_norm_without_autograd));
  m.impl("batch_norm_relu", TORCH_FN(batch_norm_relu_without_autograd));
}

}  // namespace custom_bn
