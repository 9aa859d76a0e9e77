// Autograd for batch_norm: forward through batch_norm_forward, backward through
// batch_norm_backward. With create_graph (double backward), the backward is instead written
// with differentiable ATen ops so autograd can take its gradient.
#include "autograd/common.h"

#include "op_params.h"

#include <torch/autograd.h>
#include <torch/library.h>

namespace custom_bn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using namespace custom_bn::autograd;

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, CUSTOM_BN_BATCH_NORM_PARAMS) {
    // Below Autograd but above ADInplaceOrView, which bumps the running stats' versions.
    at::AutoDispatchBelowAutograd below_autograd;
    auto [output, save_mean, save_invstd] =
        batch_norm_forward(input, weight, bias, running_mean, running_var, num_batches_tracked,
                           training, momentum, eps);
    save_batch_norm_context(ctx, input, weight, bias.has_value(), running_mean, running_var,
                            training, eps, save_mean, save_invstd);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const BatchNormContext c = load_batch_norm_context(ctx);
    const at::Tensor& grad_output = grad_outputs[0];
    variable_list grads(9);  // one per forward argument
    if (!grad_output.defined()) return grads;
    if (at::GradMode::is_enabled()) {
      const auto g = differentiable_backward(grad_output, c.input, c.weight, c.running_mean,
                                             c.running_var, c.training, c.eps, c.output_mask);
      std::copy(g.begin(), g.end(), grads.begin());
    } else {
      std::tie(grads[0], grads[1], grads[2]) = batch_norm_backward(
          grad_output, c.input, as_optional(c.weight), as_optional(c.running_mean),
          as_optional(c.running_var), c.save_mean, c.save_invstd, c.training, c.eps, c.output_mask);
    }
    return grads;
  }
};

at::Tensor batch_norm_autograd(CUSTOM_BN_BATCH_NORM_PARAMS) {
  return BatchNormFunction::apply(input, defined_or_none(weight), defined_or_none(bias),
                                  defined_or_none(running_mean), defined_or_none(running_var),
                                  training, momentum, eps, defined_or_none(num_batches_tracked));
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, Autograd, m) { m.impl("batch_norm", TORCH_FN(batch_norm_autograd)); }

}  // namespace custom_bn
