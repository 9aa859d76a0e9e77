// Autograd for batch_norm: forward through batch_norm_forward, backward through
// batch_norm_backward. With create_graph (double backward), the backward is instead written
// with differentiable ATen ops so autograd can take its gradient.
#include "autograd/common.h"

#include <custom_bn/ops.h>

#include <torch/autograd.h>
#include <torch/library.h>

namespace custom_bn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using namespace custom_bn::autograd;

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var, bool training,
                            std::optional<double> momentum, double eps,
                            const std::optional<at::Tensor>& num_batches_tracked) {
    // Below Autograd but above ADInplaceOrView, which bumps the running stats' versions.
    at::AutoDispatchBelowAutograd below_autograd;
    auto [output, save_mean, save_invstd] =
        batch_norm_forward(input, weight, bias, running_mean, running_var, num_batches_tracked,
                           training, momentum, eps);
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_weight"] = weight.has_value();
    ctx->saved_data["has_bias"] = bias.has_value();
    // Eval reads the running stats in backward; training mutates them and needs only save_*.
    ctx->save_for_backward({input, value_or_undefined(weight),
                            training ? at::Tensor() : value_or_undefined(running_mean),
                            training ? at::Tensor() : value_or_undefined(running_var), save_mean,
                            save_invstd});
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& running_mean = saved[2];
    const at::Tensor& running_var = saved[3];
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const at::Tensor& grad_output = grad_outputs[0];

    // One gradient per forward argument; absent optionals have no graph edge, so the edge of
    // bias is 1 or 2.
    variable_list grads(9);
    if (!grad_output.defined()) return grads;
    const std::array<bool, 3> output_mask{ctx->needs_input_grad(0),
                                          has_weight && ctx->needs_input_grad(1),
                                          has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)};
    if (at::GradMode::is_enabled()) {
      const auto g = differentiable_backward(grad_output, input, weight, running_mean, running_var,
                                             training, eps, output_mask);
      std::copy(g.begin(), g.end(), grads.begin());
    } else {
      std::tie(grads[0], grads[1], grads[2]) = batch_norm_backward(
          grad_output, input, as_optional(weight), as_optional(running_mean),
          as_optional(running_var), saved[4], saved[5], training, eps, output_mask);
    }
    return grads;
  }
};

at::Tensor batch_norm_autograd(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, bool training,
                               std::optional<double> momentum, double eps,
                               const std::optional<at::Tensor>& num_batches_tracked) {
  return BatchNormFunction::apply(input, defined_or_none(weight), defined_or_none(bias),
                                  defined_or_none(running_mean), defined_or_none(running_var),
                                  training, momentum, eps, defined_or_none(num_batches_tracked));
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, Autograd, m) { m.impl("batch_norm", TORCH_FN(batch_norm_autograd)); }

}  // namespace custom_bn
