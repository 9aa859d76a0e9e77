// The host-side statistics helpers of channel_stats.h, shared by the CPU and CUDA backends.
#include "channel_stats.h"

#include "checks.h"

#include <ATen/TensorOperators.h>

namespace custom_bn {

at::ScalarType stat_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::TensorOptions stat_options(const at::Tensor& input) {
  return input.options().dtype(stat_dtype(input.scalar_type()));
}

int64_t values_per_channel(const at::Tensor& input) {
  return input.size(1) == 0 ? 0 : input.numel() / input.size(1);
}

ChannelStats eval_stats(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                        const std::optional<at::Tensor>& running_var, double eps,
                        EvalInvstd eval_invstd) {
  TORCH_INTERNAL_ASSERT(has(running_mean) && has(running_var), "checked before");
  const at::TensorOptions options = stat_options(input);
  return {running_mean->reshape({input.size(1)}).to(options.dtype()).contiguous(),
          eval_invstd(*running_var, options, eps)};
}

ChannelStats backward_stats(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const at::Tensor& save_mean, const at::Tensor& save_invstd,
                            bool training, double eps, EvalInvstd eval_invstd) {
  if (!training) return eval_stats(input, running_mean, running_var, eps, eval_invstd);
  return {save_mean.reshape({-1}).contiguous(), save_invstd.reshape({-1}).contiguous()};
}

std::pair<at::Tensor, at::Tensor> param_grads(const at::Tensor& sum_dy,
                                              const at::Tensor& sum_dy_xmu,
                                              const at::Tensor& invstd, const at::Tensor& input,
                                              const std::optional<at::Tensor>& weight,
                                              bool weight_g, bool bias_g) {
  const at::ScalarType dtype = has(weight) ? weight->scalar_type() : input.scalar_type();
  const auto fresh = [dtype](const at::Tensor& t) {
    return t.to(dtype, /*non_blocking=*/false, /*copy=*/true);
  };
  return {weight_g ? fresh(sum_dy_xmu * invstd.reshape({-1})) : at::Tensor(),
          bias_g ? fresh(sum_dy) : at::Tensor()};
}

}  // namespace custom_bn
