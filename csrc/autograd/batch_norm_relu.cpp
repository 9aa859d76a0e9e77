// Autograd for batch_norm_relu: forward through batch_norm_relu_forward, backward through
// batch_norm_relu_backward. Saved: what batch_norm saves, plus the output itself, whose sign
// is the ReLU mask (the caller holds the output anyway: no extra activation is kept).
#include "autograd/common.h"

#include "op_params.h"

#include <ATen/TensorOperators.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace custom_bn {
namespace {

using namespace custom_bn::autograd;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Argument positions of batch_norm_relu (the backward returns one gradient per argument).
constexpr int kArguments = 10;
constexpr int kResidual = 9;

class BatchNormReluFunction : public torch::autograd::Function<BatchNormReluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, CUSTOM_BN_BATCH_NORM_RELU_PARAMS) {
    at::AutoDispatchBelowAutograd below_autograd;
    auto [output, save_mean, save_invstd] =
        batch_norm_relu_forward(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                residual, training, momentum, eps);
    // Graph edges exist for the tensors given, in argument order: residual's is the last.
    ctx->saved_data["residual_edge"] =
        residual.has_value()
            ? int64_t{1} + weight.has_value() + bias.has_value() + running_mean.has_value() +
                  running_var.has_value() + num_batches_tracked.has_value()
            : int64_t{-1};
    save_batch_norm_context(ctx, input, weight, bias.has_value(), running_mean, running_var,
                            training, eps, save_mean, save_invstd, {output});
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const BatchNormContext c = load_batch_norm_context(ctx);
    const at::Tensor& output = c.extra[0];
    const int64_t residual_edge = ctx->saved_data["residual_edge"].toInt();
    const at::Tensor& grad_output = grad_outputs[0];
    variable_list grads(kArguments);
    if (!grad_output.defined()) return grads;
    const bool residual_needs_grad = residual_edge >= 0 && ctx->needs_input_grad(residual_edge);
    if (at::GradMode::is_enabled()) {
      // ReLU's second derivative is zero almost everywhere: the mask is a constant of the
      // graph, and batch_norm's differentiable backward does the rest.
      const at::Tensor grad_masked = grad_output * (output > 0).to(grad_output.scalar_type());
      const auto g = differentiable_backward(grad_masked, c.input, c.weight, c.running_mean,
                                             c.running_var, c.training, c.eps, c.output_mask);
      std::copy(g.begin(), g.end(), grads.begin());
      if (residual_needs_grad) grads[kResidual] = grad_masked;
    } else {
      std::tie(grads[0], grads[1], grads[2], grads[kResidual]) = batch_norm_relu_backward(
          grad_output, output, c.input, as_optional(c.weight), as_optional(c.running_mean),
          as_optional(c.running_var), c.save_mean, c.save_invstd, c.training, c.eps,
          {c.output_mask[0], c.output_mask[1], c.output_mask[2], residual_needs_grad});
    }
    return grads;
  }
};

at::Tensor batch_norm_relu_autograd(CUSTOM_BN_BATCH_NORM_RELU_PARAMS) {
  return BatchNormReluFunction::apply(input, defined_or_none(weight), defined_or_none(bias),
                                      defined_or_none(running_mean), defined_or_none(running_var),
                                      training, momentum, eps, defined_or_none(num_batches_tracked),
                                      defined_or_none(residual));
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, Autograd, m) {
  m.impl("batch_norm_relu", TORCH_FN(batch_norm_relu_autograd));
}

}  // namespace custom_bn
