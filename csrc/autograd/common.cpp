#include "autograd/common.h"

#include <ATen/TensorOperators.h>

#include <vector>

namespace custom_bn::autograd {

void save_batch_norm_context(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                             const std::optional<at::Tensor>& weight, bool has_bias,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, bool training,
                             double eps, const at::Tensor& save_mean, const at::Tensor& save_invstd,
                             const std::vector<at::Tensor>& extra) {
  ctx->saved_data["training"] = training;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["has_weight"] = weight.has_value();
  ctx->saved_data["has_bias"] = has_bias;
  std::vector<at::Tensor> saved{input,
                                value_or_undefined(weight),
                                training ? at::Tensor() : value_or_undefined(running_mean),
                                training ? at::Tensor() : value_or_undefined(running_var),
                                save_mean,
                                save_invstd};
  saved.insert(saved.end(), extra.begin(), extra.end());
  ctx->save_for_backward(saved);
}

BatchNormContext load_batch_norm_context(torch::autograd::AutogradContext* ctx) {
  const torch::autograd::variable_list saved = ctx->get_saved_variables();
  const bool has_weight = ctx->saved_data["has_weight"].toBool();
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  return {saved[0],
          saved[1],
          saved[2],
          saved[3],
          saved[4],
          saved[5],
          std::vector<at::Tensor>(saved.begin() + 6, saved.end()),
          ctx->saved_data["training"].toBool(),
          ctx->saved_data["eps"].toDouble(),
          {ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
           has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)}};
}

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

}  // namespace custom_bn::autograd
