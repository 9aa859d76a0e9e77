#include "inplace.h"

#include "channel_stats.h"
#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>

#include <cmath>

namespace custom_bn {
namespace {

// Recovery divides by |weight|: y carries a rounding error of about ulp(y), and
// |y| <= |x_hat * weight| + |bias| + |residual|, so the error of the recovered x_hat is about
// ulp(1) * (|x_hat| + (|bias| + |residual|) / |weight|). Where the offset is below four weights,
// that is a few roundings, as the input's own x_hat carries; beyond, the input is kept.
constexpr double kRecoveryMargin = 4.0;

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

void check_batch_norm_relu_inplace_backward(
    const char* op, const at::Tensor& grad_output, const at::Tensor& output,
    const at::Tensor& kept_input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training) {
  check_batch_norm_backward(grad_output, output, weight, running_mean, running_var, save_mean,
                            save_invstd, training, op);
  check_channel_params(op, output, weight, bias, running_mean, running_var);
  if (has(residual)) check_like_input(op, "residual", *residual, output);
  TORCH_CHECK(kept_input.dim() == 1, op, ": expected kept_input to be 1-D, but got shape ",
              kept_input.sym_sizes());
  TORCH_CHECK(kept_input.scalar_type() == output.scalar_type(), op,
              ": expected kept_input of the output's dtype ", output.scalar_type(), ", but got ",
              kept_input.scalar_type());
}

at::Tensor kept_positions(const at::Tensor& output, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, const Activation& act) {
  const at::ScalarType dtype = stat_dtype(output.scalar_type());
  const int64_t dim = output.dim();
  // Clipped: at a bound where the activation is flat, as the backward's mask reads it.
  at::Tensor kept = act.slope == 0.0 ? output <= act.lower : at::zeros_like(output, at::kBool);
  if (!std::isnan(act.upper)) kept = kept | (output >= act.upper);
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

at::Tensor normalized_input(const at::Tensor& output, const at::Tensor& kept_input,
                            const at::Tensor& kept, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, const at::Tensor& mean,
                            const at::Tensor& invstd, const Activation& act) {
  const at::ScalarType dtype = stat_dtype(output.scalar_type());
  const int64_t dim = output.dim();
  const at::Tensor y = output.to(dtype);
  // act^-1 where its slope is not 0: the identity inside, lower + (y - lower) / slope below.
  at::Tensor z = y;
  if (act.slope != 0.0 && act.slope != 1.0) {
    z = at::where(y <= act.lower, (y - act.lower) / act.slope + act.lower, y);
  }
  if (has(bias)) z = z - per_channel(bias->to(dtype), dim);
  if (has(residual)) z = z - residual->to(dtype);
  const at::Tensor recovered = has(weight) ? z / per_channel(weight->to(dtype), dim) : z;
  // As many values as the output: every input value, in order (torch.compile's decomposition
  // keeps them all, csrc/../python/custom_bn/reference.py); else those at the kept positions.
  const at::Tensor input = kept_input.sym_numel() == output.sym_numel()
                               ? kept_input.to(dtype).view_symint(output.sym_sizes())
                               : at::zeros_like(y).masked_scatter_(kept, kept_input.to(dtype));
  const at::Tensor from_input =
      (input - per_channel(mean.to(dtype), dim)) * per_channel(invstd.to(dtype), dim);
  return at::where(kept, from_input, recovered);
}

}  // namespace custom_bn
