// batch_norm and batch_norm_relu, for every backend and for autograd at once: the outputs of
// batch_norm_forward and batch_norm_relu_forward, whose Autograd kernels (csrc/autograd/) make
// them differentiable. Being compositions, they are differentiable at every level of a
// torch.func transform through those kernels.
#include "op_params.h"

#include <torch/library.h>

namespace custom_bn {
namespace {

at::Tensor batch_norm_composite(CUSTOM_BN_BATCH_NORM_PARAMS) {
  return std::get<0>(batch_norm_forward(input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, training, momentum, eps));
}

at::Tensor batch_norm_relu_composite(CUSTOM_BN_BATCH_NORM_RELU_PARAMS) {
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
