// batch_norm and batch_norm_relu below autograd, for every backend (CPU, CUDA, Meta) at once:
// the outputs of batch_norm_forward and batch_norm_relu_forward. Their Autograd kernels are
// in csrc/autograd/.
#include "op_params.h"

#include <torch/library.h>

namespace custom_bn {
namespace {

at::Tensor batch_norm_without_autograd(CUSTOM_BN_BATCH_NORM_PARAMS) {
  return std::get<0>(batch_norm_forward(input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, training, momentum, eps));
}

at::Tensor batch_norm_relu_without_autograd(CUSTOM_BN_BATCH_NORM_RELU_PARAMS) {
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
