// Autograd for batch_norm: forward through batch_norm_forward, backward through
// batch_norm_backward. With create_graph (double backward), the backward is instead written
// with differentiable ATen ops so autograd can take its gradient.
#include <custom_bn/ops.h>

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace custom_bn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

std::optional<at::Tensor> as_optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

std::optional<at::Tensor> defined_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t : std::nullopt;
}

// The backward written with ATen ops. The batch statistics are recomputed from input rather
// than taken from the saved ones, so that their dependence on input is part of the graph:
// second-order gradients need it.
std::array<at::Tensor, 3> differentiable_backward(const at::Tensor& grad_output,
                                                  const at::Tensor& input, const at::Tensor& weight,
                                                  const at::Tensor& running_mean,
                                                  const at::Tensor& running_var, bool training,
                                                  double eps, std::array<bool, 3> output_mask) {
  const at::ScalarType stat = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<int64_t> reduce_dims{0};
  c10::SymDimVector channel_shape(input.dim(), 1);
  channel_shape[1] = input.sym_size(1);
  for (int64_t d = 2; d < input.dim(); ++d) reduce_dims.push_back(d);

  const at::Tensor x = input.to(stat);
  const at::Tensor dy = grad_output.to(stat);
  at::Tensor mean, invstd;
  if (training) {
    mean = x.mean(reduce_dims, /*keepdim=*/true);
    invstd = ((x - mean).square().mean(reduce_dims, /*keepdim=*/true) + eps).rsqrt();
  } else {
    mean = running_mean.to(stat).reshape_symint(channel_shape);
    invstd = (running_var.to(stat).reshape_symint(channel_shape) + eps).rsqrt();
  }
  const at::Tensor x_hat = (x - mean) * invstd;
  const at::Tensor scale =
      weight.defined() ? weight.to(stat).reshape_symint(channel_shape) * invstd : invstd;
  const at::ScalarType param_dtype = weight.defined() ? weight.scalar_type() : input.scalar_type();

  std::array<at::Tensor, 3> grads;
  if (output_mask[0]) {
    at::Tensor grad_input = training ? scale * (dy - dy.mean(reduce_dims, true) -
                                                x_hat * (dy * x_hat).mean(reduce_dims, true))
                                     : dy * scale;
    grads[0] = grad_input.to(input.scalar_type());
  }
  if (output_mask[1]) grads[1] = (dy * x_hat).sum(reduce_dims).to(param_dtype);
  if (output_mask[2]) grads[2] = dy.sum(reduce_dims).to(param_dtype);
  return grads;
}

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
