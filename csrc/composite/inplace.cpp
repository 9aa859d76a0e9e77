// In-place activated batch norm for every backend at once, in the backends' own ops
// (csrc/inplace.cpp): batch_norm_relu_ is the forward stage op, whose Autograd kernel
// (csrc/autograd/inplace.cpp) makes it differentiable; the stage ops run the generic steps
// where a backend has no kernels of its own (the CPU's: csrc/cpu/inplace.cpp; CUDA's:
// csrc/cuda/inplace.cu).
#include "inplace.h"
#include "checks.h"
#include "op_params.h"

#include <ATen/core/grad_mode.h>
#include <torch/library.h>

namespace custom_bn {
namespace {

bool requires_grad(const std::optional<at::Tensor>& t) { return has(t) && t->requires_grad(); }

at::Tensor& batch_norm_relu_inplace_composite(CUSTOM_BN_BATCH_NORM_RELU_INPLACE_PARAMS) {
  // Nothing to keep for a backward that cannot come.
  const bool keep_input =
      at::GradMode::is_enabled() && (input.requires_grad() || requires_grad(weight) ||
                                     requires_grad(bias) || requires_grad(residual));
  batch_norm_relu_forward_(input, weight, bias, running_mean, running_var, num_batches_tracked,
                           residual, training, momentum, eps, CUSTOM_BN_INPLACE_ACTIVATION_ARGS,
                           keep_input);
  return input;
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_relu_", TORCH_FN(batch_norm_relu_inplace_composite));
}

TORCH_LIBRARY_IMPL(custom_bn, CompositeExplicitAutograd, m) {
  CUSTOM_BN_REGISTER_INPLACE_OPS(m, kGenericInplaceSteps);
}

}  // namespace custom_bn
