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

at::Tensor channel_vector(const at::Tensor& t, int64_t channels, at::ScalarType dtype) {
  if (t.dim() == 1 && t.scalar_type() == dtype && t.is_contiguous()) return t;
  return t.reshape({channels}).to(dtype).contiguous();
}

ChannelStats eval_stats(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                        const std::optional<at::Tensor>& running_var, double eps,
                        EvalInvstd eval_invstd) {
  TORCH_INTERNAL_ASSERT(has(running_mean) && has(running_var), "checked before");
  const at::TensorOptions options = stat_options(input);
  return {channel_vector(*running_mean, input.size(1), options.dtype().toScalarType()),
          eval_invstd(*running_var, options, eps)};
}

ChannelStats backward_stats(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const at::Tensor& save_mean, const at::Tensor& save_invstd,
                            bool training, double eps, EvalInvstd eval_invstd) {
  if (!training) return eval_stats(input, running_mean, running_var, eps, eval_invstd);
  const int64_t channels = save_mean.numel();
  return {channel_vector(save_mean, channels, save_mean.scalar_type()),
          channel_vector(save_invstd, channels, save_invstd.scalar_type())};
}

std::pair<at::Tensor, at::Tensor> param_grads(const at::Tensor& sum_dy,
                                              const at::Tensor& sum_dy_xmu,
                                              const at::Tensor& invstd, const at::Tensor& input,
                                              const std::optional<at::Tensor>& weight,
                                              bool weight_g, bool bias_g) {
  const at::ScalarType dtype = has(weight) ? weight->scalar_type() : input.scalar_type();
  const at::Tensor invstd_c = channel_vector(invstd, invstd.numel(), invstd.scalar_type());
  const auto in_dtype = [dtype](const at::Tensor& t) {
    return t.scalar_type() == dtype ? t : t.to(dtype);
  };
  return {weight_g ? in_dtype(sum_dy_xmu * invstd_c) : at::Tensor(),
          bias_g ? in_dtype(sum_dy) : at::Tensor()};
}

}  // namespace custom_bn
