// The differentiable formulas of formulas.h, in ATen ops on the statistics dtype.
#include "autograd/formulas.h"

#include "channel_stats.h"

#include <ATen/TensorOperators.h>

#include <vector>

namespace custom_bn::autograd {
namespace {

// x (in the statistics dtype), x_hat, invstd and the per-channel view of a (C,) tensor.
struct Normalized {
  at::ScalarType stat;
  std::vector<int64_t> reduce_dims;  // every dim but the channels'
  c10::SymDimVector channel_shape;   // (1, C, 1, ...)
  at::Tensor x, invstd, x_hat;

  at::Tensor per_channel(const at::Tensor& t) const {
    return t.to(stat).reshape_symint(channel_shape);
  }
  at::Tensor mean_over_batch(const at::Tensor& t) const {
    return t.mean(reduce_dims, /*keepdim=*/true);
  }
};

Normalized normalize(const at::Tensor& input, const at::Tensor& running_mean,
                     const at::Tensor& running_var, bool training, double eps) {
  Normalized n{stat_dtype(input.scalar_type()), {0}, c10::SymDimVector(input.dim(), 1), {}, {}, {}};
  n.channel_shape[1] = input.sym_size(1);
  for (int64_t d = 2; d < input.dim(); ++d) n.reduce_dims.push_back(d);
  n.x = input.to(n.stat);
  at::Tensor mean, var;
  if (training) {
    mean = n.mean_over_batch(n.x);
    var = n.mean_over_batch((n.x - mean).square());
  } else {
    mean = n.per_channel(running_mean);
    var = n.per_channel(running_var);
  }
  // 1 / sqrt(var + eps), as batch_norm_math.h's invstd_from_var.
  n.invstd = (var + eps).sqrt().reciprocal();
  n.x_hat = (n.x - mean) * n.invstd;
  return n;
}

}  // namespace

std::array<at::Tensor, 3> differentiable_backward(const at::Tensor& grad_output,
                                                  const at::Tensor& input, const at::Tensor& weight,
                                                  const at::Tensor& running_mean,
                                                  const at::Tensor& running_var, bool training,
                                                  double eps, std::array<bool, 3> output_mask) {
  const Normalized n = normalize(input, running_mean, running_var, training, eps);
  const at::Tensor dy = grad_output.to(n.stat);
  const at::Tensor scale = weight.defined() ? n.per_channel(weight) * n.invstd : n.invstd;
  const at::ScalarType param_dtype = weight.defined() ? weight.scalar_type() : input.scalar_type();
  std::array<at::Tensor, 3> grads;
  if (output_mask[0]) {
    // Training: grad_x = w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)).
    const at::Tensor grad_input =
        training ? scale * (dy - n.mean_over_batch(dy) - n.x_hat * n.mean_over_batch(dy * n.x_hat))
                 : dy * scale;
    grads[0] = grad_input.to(input.scalar_type());
  }
  if (output_mask[1]) grads[1] = (dy * n.x_hat).sum(n.reduce_dims).to(param_dtype);
  if (output_mask[2]) grads[2] = dy.sum(n.reduce_dims).to(param_dtype);
  return grads;
}

at::Tensor forward_tangent(const at::Tensor& input, const at::Tensor& weight,
                           const at::Tensor& running_mean, const at::Tensor& running_var,
                           bool training, double eps, const at::Tensor& input_tangent,
                           const at::Tensor& weight_tangent, const at::Tensor& bias_tangent) {
  const Normalized n = normalize(input, running_mean, running_var, training, eps);
  at::Tensor tangent = at::zeros_like(n.x_hat);
  if (input_tangent.defined()) {
    // Training: d x_hat = invstd * (dx - mean(dx) - x_hat * mean(x_hat * dx)); eval: invstd * dx.
    const at::Tensor dx = input_tangent.to(n.stat);
    at::Tensor dx_hat =
        training
            ? n.invstd * (dx - n.mean_over_batch(dx) - n.x_hat * n.mean_over_batch(n.x_hat * dx))
            : n.invstd * dx;
    tangent = tangent + (weight.defined() ? dx_hat * n.per_channel(weight) : dx_hat);
  }
  if (weight_tangent.defined()) tangent = tangent + n.x_hat * n.per_channel(weight_tangent);
  if (bias_tangent.defined()) tangent = tangent + n.per_channel(bias_tangent);
  return tangent.to(input.scalar_type());
}

}  // namespace custom_bn::autograd
