// The differentiable formulas of formulas.h, in ATen ops on the statistics dtype.
#include "autograd/formulas.h"

#include "channel_stats.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/hardswish_backward.h>
#include <ATen/ops/sigmoid.h>

#include <cmath>
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
  // Training: the derivative of x_hat along v is invstd * project(v), with
  // project(v) = v - mean(v) - x_hat * mean(x_hat * v), self-adjoint. Eval: v itself.
  at::Tensor project(const at::Tensor& v, bool training) const {
    return training ? v - mean_over_batch(v) - x_hat * mean_over_batch(x_hat * v) : v;
  }
};

// a + b, where an undefined tensor is zero.
at::Tensor sum_of(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  return b.defined() ? a + b : a;
}

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
    grads[0] = (scale * n.project(dy, training)).to(input.scalar_type());
  }
  if (output_mask[1]) grads[1] = (dy * n.x_hat).sum(n.reduce_dims).to(param_dtype);
  if (output_mask[2]) grads[2] = dy.sum(n.reduce_dims).to(param_dtype);
  return grads;
}

std::array<at::Tensor, 3> double_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                          const at::Tensor& weight, const at::Tensor& running_mean,
                                          const at::Tensor& running_var, bool training, double eps,
                                          const at::Tensor& gg_input, const at::Tensor& gg_weight,
                                          const at::Tensor& gg_bias,
                                          std::array<bool, 3> output_mask) {
  // The backward is grad_input = w * invstd * project(dy), grad_weight = sum(dy * x_hat),
  // grad_bias = sum(dy); below, a = gg_input, b = gg_weight, c = gg_bias and P = project.
  const Normalized n = normalize(input, running_mean, running_var, training, eps);
  const at::Tensor dy = grad_output.to(n.stat);
  const at::Tensor a = gg_input.defined() ? gg_input.to(n.stat) : at::Tensor();
  const at::Tensor b = gg_weight.defined() ? n.per_channel(gg_weight) : at::Tensor();
  const at::Tensor c = gg_bias.defined() ? n.per_channel(gg_bias) : at::Tensor();
  const at::Tensor w = weight.defined() ? n.per_channel(weight) : at::Tensor();
  const auto times_weight = [&](const at::Tensor& t) { return w.defined() ? t * w : t; };
  const at::Tensor projected_dy = n.project(dy, training);
  std::array<at::Tensor, 3> grads;
  if (output_mask[0]) {
    // P is self-adjoint: d/d(dy) = w * invstd * P(a) + b * x_hat + c.
    at::Tensor g = a.defined() ? times_weight(n.invstd * n.project(a, training)) : at::Tensor();
    g = sum_of(sum_of(g, b.defined() ? b * n.x_hat : at::Tensor()), c);
    if (g.defined()) grads[0] = g.expand_as(dy).to(grad_output.scalar_type());
  }
  if (output_mask[1]) {
    // b * d x_hat^T dy, and in training, through invstd and x_hat in grad_input:
    // w * invstd^2 * (-mean(a * P(dy)) * x_hat - mean(x_hat * dy) * P(a) - mean(a * x_hat) *
    // P(dy)).
    at::Tensor g = b.defined() ? b * n.invstd * projected_dy : at::Tensor();
    if (training && a.defined()) {
      const at::Tensor through_statistics =
          -(n.mean_over_batch(a * projected_dy) * n.x_hat +
            n.mean_over_batch(n.x_hat * dy) * n.project(a, training) +
            n.mean_over_batch(a * n.x_hat) * projected_dy);
      g = sum_of(g, times_weight(n.invstd.square() * through_statistics));
    }
    if (g.defined()) grads[1] = g.to(input.scalar_type());
  }
  if (output_mask[2] && weight.defined() && a.defined()) {
    grads[2] = (a * n.invstd * projected_dy).sum(n.reduce_dims).to(weight.scalar_type());
  }
  return grads;
}

at::Tensor forward_tangent(const at::Tensor& input, const at::Tensor& weight,
                           const at::Tensor& running_mean, const at::Tensor& running_var,
                           bool training, double eps, const at::Tensor& input_tangent,
                           const at::Tensor& weight_tangent, const at::Tensor& bias_tangent) {
  const Normalized n = normalize(input, running_mean, running_var, training, eps);
  at::Tensor tangent = at::zeros_like(n.x_hat);
  if (input_tangent.defined()) {
    const at::Tensor dx_hat = n.invstd * n.project(input_tangent.to(n.stat), training);
    tangent = tangent + (weight.defined() ? dx_hat * n.per_channel(weight) : dx_hat);
  }
  if (weight_tangent.defined()) tangent = tangent + n.x_hat * n.per_channel(weight_tangent);
  if (bias_tangent.defined()) tangent = tangent + n.per_channel(bias_tangent);
  return tangent.to(input.scalar_type());
}

at::Tensor activation_grad(const at::Tensor& grad, const at::Tensor& output,
                           const Activation& act) {
  if (!output.defined()) return grad;
  const at::ScalarType dtype = grad.scalar_type();
  // 1 above lower, else slope (exactly: m + (1 - m) * slope for m in {0, 1}); then 0 at or
  // above upper. A NaN output counts as below, as in the kernels.
  const at::Tensor above_lower = (output > act.lower).to(dtype);
  at::Tensor derivative = above_lower + (1.0 - above_lower) * act.slope;
  if (!std::isnan(act.upper)) derivative = derivative * (1.0 - (output >= act.upper).to(dtype));
  return grad * derivative;
}

at::Tensor pre_activation(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& running_mean, const at::Tensor& running_var,
                          bool training, double eps) {
  const Normalized n = normalize(input, running_mean, running_var, training, eps);
  at::Tensor z = weight.defined() ? n.x_hat * n.per_channel(weight) : n.x_hat;
  return bias.defined() ? z + n.per_channel(bias) : z;
}

at::Tensor activation_grad_at(const at::Tensor& grad, const at::Tensor& v, const Activation& act) {
  const at::Tensor g = grad.to(v.scalar_type());
  at::Tensor result;
  switch (act.kind) {
    case ActivationKind::kSilu: {
      // silu_backward has no derivative of its own in ATen: its formula instead.
      const at::Tensor s = at::sigmoid(v);
      result = g * s * (1 + v * (1 - s));
      break;
    }
    case ActivationKind::kHardswish:
      result = at::hardswish_backward(g, v);
      break;
    default:
      result = at::gelu_backward(g, v);
      break;
  }
  return result.to(grad.scalar_type());
}

}  // namespace custom_bn::autograd
