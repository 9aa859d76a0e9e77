#include "inplace.h"

#include "channel_stats.h"
#include "checks.h"
#include "optional_tensor.h"

#include <custom_bn/ops.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace custom_bn {
namespace {

// A per-channel tensor shaped to broadcast against an (N, C, *) tensor of `dim` dims.
at::Tensor per_channel(const at::Tensor& t, int64_t dim) {
  c10::SymDimVector shape(dim, 1);
  shape[1] = t.sym_numel();
  return t.view_symint(shape);
}

}  // namespace

Activation checked_inplace_activation(const char* op, double min_val, std::optional<double> max_val,
                                      double negative_slope) {
  return checked_activation(op, min_val, max_val, negative_slope, "piecewise_linear");
}

void check_batch_norm_relu_forward_inplace(const char* op, const at::Tensor& input,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& running_mean,
                                           const std::optional<at::Tensor>& running_var,
                                           const std::optional<at::Tensor>& num_batches_tracked,
                                           const std::optional<at::Tensor>& residual, bool training,
                                           std::optional<double> momentum) {
  check_batch_norm_forward(op, input, weight, bias, running_mean, running_var, num_batches_tracked,
                           training, momentum, residual);
  // torch's own error for in-place writes to expanded tensors.
  at::assert_no_internal_overlap(input);
}

namespace {

// kept_input: 1-D, of the output's dtype and device (its length is checked against the output).
void check_kept_input(const char* op, const at::Tensor& kept_input, const at::Tensor& output) {
  TORCH_CHECK(kept_input.defined(), op, ": expected kept_input to be a tensor, but got None");
  TORCH_CHECK(kept_input.dim() == 1, op, ": expected kept_input to be 1-D, but got shape ",
              kept_input.sym_sizes());
  TORCH_CHECK(kept_input.scalar_type() == output.scalar_type(), op,
              ": expected kept_input of the output's dtype ", output.scalar_type(), ", but got ",
              kept_input.scalar_type());
  check_same_device(op, "kept_input", kept_input, output);
}

}  // namespace

void check_batch_norm_relu_inplace_backward(
    const char* op, const at::Tensor& grad_output, const at::Tensor& output,
    const at::Tensor& kept_input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training) {
  check_input(op, output, "output");  // check_batch_norm_backward's own would name it input
  check_batch_norm_backward(grad_output, output, weight, running_mean, running_var, save_mean,
                            save_invstd, training, op);
  check_channel_params(op, output, weight, bias, running_mean, running_var);
  if (has(residual)) check_like_input(op, "residual", *residual, output);
  check_kept_input(op, kept_input, output);
}

void check_batch_norm_relu_normalized_input(const char* op, const at::Tensor& output,
                                            const at::Tensor& kept_input,
                                            const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& residual,
                                            const at::Tensor& mean, const at::Tensor& invstd) {
  check_input(op, output, "output");  // check_elemt's own would name it input
  check_elemt(op, output, weight, bias, mean, invstd);
  if (has(residual)) check_like_input(op, "residual", *residual, output);
  check_kept_input(op, kept_input, output);
}

at::Tensor kept_positions(const at::Tensor& output, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, const Activation& act) {
  const at::ScalarType dtype = stat_dtype(output.scalar_type());
  const int64_t dim = output.dim();
  const at::Tensor y = output.to(dtype);
  // Clipped: at a bound where the activation is flat, as the backward's mask reads it (and
  // +-inf, which no activation gives back either).
  const double infinity = std::numeric_limits<double>::infinity();
  const double lower = act.slope == 0.0 ? act.lower : -infinity;
  const double upper = std::isnan(act.upper) ? infinity : act.upper;
  at::Tensor kept = (y <= lower) | (y >= upper);
  // Unsafe to recover; written as "not safe" so that NaN counts as unsafe.
  if (!has(bias) && !has(residual)) {
    if (has(weight)) kept = kept | per_channel(weight->eq(0), dim);
    return kept;
  }
  const at::Tensor scale = has(weight)
                               ? per_channel(weight->to(dtype).abs() * kRecoveryMargin, dim)
                               : at::full({}, kRecoveryMargin, output.options().dtype(dtype));
  at::Tensor offset;
  if (has(bias)) offset = per_channel(bias->to(dtype).abs(), dim);
  if (has(residual)) {
    const at::Tensor r = residual->to(dtype).abs();
    offset = offset.defined() ? offset + r : r;
  }
  return kept | (scale > offset).logical_not();
}

std::vector<int64_t> memory_order(const at::Tensor& t) {
  std::vector<int64_t> order(t.dim());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return t.stride(a) > t.stride(b); });
  return order;
}

void check_kept_count(const char* op, int64_t kept, const at::Tensor& kept_input) {
  TORCH_CHECK(kept_input.numel() == kept, op, ": expected kept_input with the ", kept,
              " values the forward kept (or all of the input's), but got ", kept_input.numel(),
              " (the output or the residual changed after the forward?)");
}

bool keeps_every_value(at::ScalarType dtype) {
  return dtype == at::kBFloat16 || dtype == at::kHalf;
}

namespace {

std::vector<int64_t> inverse_permutation(const std::vector<int64_t>& order) {
  std::vector<int64_t> inverse(order.size());
  for (size_t d = 0; d < order.size(); ++d) inverse[order[d]] = static_cast<int64_t>(d);
  return inverse;
}

// Every input value, as kept_input holds it then (memory order): a view in the output's layout.
at::Tensor every_input_value(const at::Tensor& output, const at::Tensor& kept_input) {
  const std::vector<int64_t> order = memory_order(output);
  return kept_input.view(output.permute(order).sizes()).permute(inverse_permutation(order));
}

}  // namespace

namespace {

at::Tensor write_output_keeping_input(at::Tensor& input, const at::Tensor& output,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual,
                                      const Activation& act) {
  const std::vector<int64_t> order = memory_order(input);
  const at::Tensor kept_input = input.permute(order).masked_select(
      kept_positions(output, weight, bias, residual, act).permute(order));
  input.copy_(output);
  return kept_input;
}

at::Tensor normalized_input(const char* op, const at::Tensor& output, const at::Tensor& kept_input,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, const at::Tensor& mean,
                            const at::Tensor& invstd, const Activation& act) {
  const at::ScalarType dtype = stat_dtype(output.scalar_type());
  const int64_t dim = output.dim();
  const at::Tensor kept = kept_positions(output, weight, bias, residual, act);
  const at::Tensor y = output.to(dtype);
  // act^-1 where its slope is not 0: the identity inside, lower + (y - lower) / slope below.
  at::Tensor z = y;
  if (act.slope != 0.0 && act.slope != 1.0) {
    z = at::where(y <= act.lower, (y - act.lower) / act.slope + act.lower, y);
  }
  if (has(bias)) z = z - per_channel(bias->to(dtype), dim);
  if (has(residual)) z = z - residual->to(dtype);
  const at::Tensor recovered = has(weight) ? z / per_channel(weight->to(dtype), dim) : z;
  // The kept input values, in memory order, at their positions.
  const std::vector<int64_t> order = memory_order(output);
  const at::Tensor kept_in_order = kept.permute(order);
  check_kept_count(op, kept.sum().item<int64_t>(), kept_input);
  const at::Tensor input = at::zeros(kept_in_order.sizes(), y.options())
                               .masked_scatter_(kept_in_order, kept_input.to(dtype))
                               .permute(inverse_permutation(order));
  const at::Tensor from_input =
      (input - per_channel(mean.to(dtype), dim)) * per_channel(invstd.to(dtype), dim);
  return at::where(kept, from_input, recovered);
}

}  // namespace

const InplaceSteps kGenericInplaceSteps{write_output_keeping_input, normalized_input};

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_forward_inplace(
    const InplaceSteps& steps, CUSTOM_BN_BATCH_NORM_RELU_FORWARD_INPLACE_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_forward_";
  const Activation act = checked_inplace_activation(op, min_val, max_val, negative_slope);
  check_batch_norm_relu_forward_inplace(op, input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, residual, training, momentum);
  if (training && keep_input && steps.training_forward != nullptr &&
      !keeps_every_value(input.scalar_type())) {
    if (auto result = steps.training_forward(input, weight, bias, running_mean, running_var,
                                             num_batches_tracked, residual, momentum, eps, act)) {
      return *std::move(result);
    }
  }
  const auto [output, save_mean, save_invstd] = batch_norm_relu_forward(
      input, weight, bias, running_mean, running_var, num_batches_tracked, residual, training,
      momentum, eps, min_val, max_val, negative_slope, "piecewise_linear");
  at::Tensor kept_input;
  if (keep_input && keeps_every_value(input.scalar_type())) {
    kept_input = input.permute(memory_order(input)).clone(at::MemoryFormat::Contiguous).view(-1);
    input.copy_(output);
  } else if (keep_input) {
    kept_input = steps.write_output_keeping_input(input, output, weight, bias, residual, act);
  } else {
    kept_input = at::empty({0}, input.options());
    input.copy_(output);
  }
  return {save_mean, save_invstd, kept_input};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_inplace_backward(
    const InplaceSteps& steps, CUSTOM_BN_BATCH_NORM_RELU_INPLACE_BACKWARD_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_inplace_backward";
  const Activation act = checked_inplace_activation(op, min_val, max_val, negative_slope);
  check_batch_norm_relu_inplace_backward(op, grad_output, output, kept_input, weight, bias,
                                         residual, running_mean, running_var, save_mean,
                                         save_invstd, training);
  const std::optional<at::Tensor> none;
  if (kept_input.numel() == output.numel()) {
    // Every input value kept (low precision, inductor's decomposition): the fused op's backward.
    return batch_norm_relu_backward(grad_output, output, every_input_value(output, kept_input),
                                    weight, running_mean, running_var, save_mean, save_invstd,
                                    training, eps, output_mask, min_val, max_val, negative_slope,
                                    "piecewise_linear", none);
  }
  const at::ScalarType dtype = stat_dtype(output.scalar_type());
  const at::Tensor mean = training ? save_mean : running_mean->to(dtype);
  const at::Tensor invstd = training ? save_invstd : (running_var->to(dtype) + eps).rsqrt();
  if (steps.backward != nullptr) {
    if (auto result = steps.backward(op, grad_output, output, kept_input.contiguous(), weight, bias,
                                     residual, mean, invstd, training, output_mask, act)) {
      return *std::move(result);
    }
  }
  const at::Tensor x_hat = steps.normalized_input(op, output, kept_input.contiguous(), weight, bias,
                                                  residual, mean, invstd, act);
  // x_hat is batch_norm_relu_backward's input normalized by mean 0 and invstd 1, with the
  // weight scaled by invstd: the same gradients, computed in the statistics dtype.
  const at::Tensor scale = has(weight) ? weight->to(dtype) * invstd : invstd;
  const at::Tensor zeros = at::zeros_like(invstd), ones = at::ones_like(invstd);
  const at::Tensor no_stats = at::empty({0}, invstd.options());
  const auto [grad_input, grad_scale, grad_bias, grad_residual] = batch_norm_relu_backward(
      grad_output.to(dtype), output.to(dtype), x_hat, scale, training ? none : zeros,
      training ? none : ones, training ? zeros : no_stats, training ? ones : no_stats, training,
      training ? eps : 0.0, output_mask, min_val, max_val, negative_slope, "piecewise_linear",
      none);
  // grad_weight = sum(dz * x_hat) whatever the weight; the gradients in the forward's dtypes.
  const at::ScalarType param_dtype = has(weight) ? weight->scalar_type() : output.scalar_type();
  const auto in = [](const at::Tensor& t, at::ScalarType type) {
    return t.defined() ? t.to(type) : t;
  };
  return {in(grad_input, output.scalar_type()),
          has(weight) ? in(grad_scale, param_dtype) : at::Tensor(), in(grad_bias, param_dtype),
          in(grad_residual, output.scalar_type())};
}

at::Tensor run_normalized_input(const InplaceSteps& steps,
                                CUSTOM_BN_BATCH_NORM_RELU_NORMALIZED_INPUT_PARAMS) {
  const char* op = "custom_bn::batch_norm_relu_normalized_input";
  const Activation act = checked_inplace_activation(op, min_val, max_val, negative_slope);
  check_batch_norm_relu_normalized_input(op, output, kept_input, weight, bias, residual, mean,
                                         invstd);
  if (kept_input.numel() == output.numel()) {
    const at::ScalarType dtype = stat_dtype(output.scalar_type());
    const int64_t dim = output.dim();
    return (every_input_value(output, kept_input).to(dtype) - per_channel(mean, dim)) *
           per_channel(invstd, dim);
  }
  return steps.normalized_input(op, output, kept_input.contiguous(), weight, bias, residual, mean,
                                invstd, act);
}

}  // namespace custom_bn
