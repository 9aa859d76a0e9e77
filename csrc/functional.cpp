// The C++ API: each function finds its schema once and calls through the dispatcher.
#include <custom_bn/ops.h>

#include <ATen/core/dispatch/Dispatcher.h>

namespace custom_bn {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

#define CUSTOM_BN_OP_HANDLE(op) \
  static const auto handle = find_op<decltype(::custom_bn::op)>("custom_bn::" #op)

at::Tensor batch_norm(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& running_mean,
                      const std::optional<at::Tensor>& running_var, bool training,
                      std::optional<double> momentum, double eps,
                      const std::optional<at::Tensor>& num_batches_tracked) {
  CUSTOM_BN_OP_HANDLE(batch_norm);
  return handle.call(input, weight, bias, running_mean, running_var, training, momentum, eps,
                     num_batches_tracked);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps) {
  CUSTOM_BN_OP_HANDLE(batch_norm_forward);
  return handle.call(input, weight, bias, running_mean, running_var, num_batches_tracked, training,
                     momentum, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, double eps,
    std::array<bool, 3> output_mask) {
  CUSTOM_BN_OP_HANDLE(batch_norm_backward);
  return handle.call(grad_output, input, weight, running_mean, running_var, save_mean, save_invstd,
                     training, eps, output_mask);
}

at::Tensor batch_norm_relu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var, bool training,
                           std::optional<double> momentum, double eps,
                           const std::optional<at::Tensor>& num_batches_tracked,
                           const std::optional<at::Tensor>& residual) {
  CUSTOM_BN_OP_HANDLE(batch_norm_relu);
  return handle.call(input, weight, bias, running_mean, running_var, training, momentum, eps,
                     num_batches_tracked, residual);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, const std::optional<at::Tensor>& residual,
    bool training, std::optional<double> momentum, double eps) {
  CUSTOM_BN_OP_HANDLE(batch_norm_relu_forward);
  return handle.call(input, weight, bias, running_mean, running_var, num_batches_tracked, residual,
                     training, momentum, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, std::array<bool, 4> output_mask) {
  CUSTOM_BN_OP_HANDLE(batch_norm_relu_backward);
  return handle.call(grad_output, output, input, weight, running_mean, running_var, save_mean,
                     save_invstd, training, eps, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input) {
  CUSTOM_BN_OP_HANDLE(batch_norm_stats);
  return handle.call(input);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_gather_stats_with_counts(
    const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& counts,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
    double eps) {
  CUSTOM_BN_OP_HANDLE(batch_norm_gather_stats_with_counts);
  return handle.call(mean, m2, counts, running_mean, running_var, num_batches_tracked, momentum,
                     eps);
}

at::Tensor batch_norm_elemt(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                            const at::Tensor& invstd) {
  CUSTOM_BN_OP_HANDLE(batch_norm_elemt);
  return handle.call(input, weight, bias, mean, invstd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool input_g, bool weight_g,
    bool bias_g) {
  CUSTOM_BN_OP_HANDLE(batch_norm_backward_reduce);
  return handle.call(grad_output, input, mean, invstd, weight, input_g, weight_g, bias_g);
}

at::Tensor batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                                     const at::Tensor& mean, const at::Tensor& invstd,
                                     const std::optional<at::Tensor>& weight,
                                     const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                     const at::Tensor& count) {
  CUSTOM_BN_OP_HANDLE(batch_norm_backward_elemt);
  return handle.call(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count);
}

#undef CUSTOM_BN_OP_HANDLE

}  // namespace custom_bn
