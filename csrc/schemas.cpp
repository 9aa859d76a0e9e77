// The op schemas, defined once, here (the README's table of ops says what each does). Backends
// live in one folder per dispatch key and hold only their TORCH_LIBRARY_IMPL blocks.
#include <torch/library.h>

TORCH_LIBRARY(custom_bn, m) {
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float? momentum, float eps, "
      "Tensor(c!)? num_batches_tracked=None) -> Tensor");
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, float? momentum, "
      "float eps) -> (Tensor output, Tensor save_mean, Tensor save_invstd)");
  // Evaluation mode without mutation: normalizes with the running statistics, which it only
  // reads (batch_norm with training=False calls it, so that an exported eval graph writes no
  // state); with relu, batch_norm_relu's activation of (batch_norm(input) + residual).
  m.def(
      "batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, float eps, bool relu=False, Tensor? residual=None, "
      "float min_val=0., float? max_val=None, float negative_slope=0., "
      "str activation='piecewise_linear') -> Tensor");
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? running_mean, "
      "Tensor? running_var, Tensor save_mean, Tensor save_invstd, bool training, float eps, "
      "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Fused: act(batch_norm(input) + residual), act piecewise linear: identity inside
  // (min_val, max_val), negative_slope * v at or below min_val (min_val itself with slope 0),
  // max_val at or above it. The defaults are ReLU; ReLU6 is (0, 6, 0), hardtanh (a, b, 0),
  // LeakyReLU(s) (0, None, s), identity (0, None, 1). The backward reads the activation's
  // gradient from the forward's output, so nothing beyond batch_norm's saved tensors is kept.
  // Or act is smooth, activation='silu', 'hardswish' or 'gelu' (the three parameters at their
  // defaults, no residual): its backward recomputes the pre-activation from input, weight and
  // bias ('piecewise_linear' is the function the parameters describe).
  m.def(
      "batch_norm_relu(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float? momentum, float eps, "
      "Tensor(c!)? num_batches_tracked=None, Tensor? residual=None, float min_val=0., "
      "float? max_val=None, float negative_slope=0., str activation='piecewise_linear') -> Tensor");
  m.def(
      "batch_norm_relu_forward(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
      "Tensor? residual, bool training, float? momentum, float eps, float min_val=0., "
      "float? max_val=None, float negative_slope=0., str activation='piecewise_linear') "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd)");
  m.def(
      "batch_norm_relu_backward(Tensor grad_output, Tensor output, Tensor input, Tensor? weight, "
      "Tensor? running_mean, Tensor? running_var, Tensor save_mean, Tensor save_invstd, "
      "bool training, float eps, bool[4] output_mask, float min_val=0., float? max_val=None, "
      "float negative_slope=0., str activation='piecewise_linear', Tensor? bias=None) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_residual)");
  // In place (in-place activated batch norm): batch_norm_relu with a piecewise-linear activation
  // whose output is written over its input. For the backward it keeps the output (the input,
  // now), the residual and, as kept_input, the input values the output cannot give back: where
  // the activation clipped, and where recovering the normalized input from the output loses
  // precision (csrc/composite/inplace.cpp states the rule). batch_norm_relu_ returns input,
  // as ATen's in-place ops return self; its stage ops return only new tensors, so that
  // torch.compile's functionalization can take them.
  m.def(
      "batch_norm_relu_(Tensor(a!) input, Tensor? weight, Tensor? bias, "
      "Tensor(b!)? running_mean, Tensor(c!)? running_var, bool training, float? momentum, "
      "float eps, Tensor(d!)? num_batches_tracked=None, Tensor? residual=None, float min_val=0., "
      "float? max_val=None, float negative_slope=0.) -> Tensor(a!)");
  m.def(
      "batch_norm_relu_forward_(Tensor(a!) input, Tensor? weight, Tensor? bias, "
      "Tensor(b!)? running_mean, Tensor(c!)? running_var, Tensor(d!)? num_batches_tracked, "
      "Tensor? residual, bool training, float? momentum, float eps, float min_val=0., "
      "float? max_val=None, float negative_slope=0., bool keep_input=True) "
      "-> (Tensor save_mean, Tensor save_invstd, Tensor kept_input)");
  m.def(
      "batch_norm_relu_inplace_backward(Tensor grad_output, Tensor output, Tensor kept_input, "
      "Tensor? weight, Tensor? bias, Tensor? residual, Tensor? running_mean, "
      "Tensor? running_var, Tensor save_mean, Tensor save_invstd, bool training, float eps, "
      "bool[4] output_mask, float min_val=0., float? max_val=None, float negative_slope=0.) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  m.def("batch_norm_stats(Tensor input) -> (Tensor count, Tensor mean, Tensor m2)");
  m.def(
      "batch_norm_gather_stats_with_counts(Tensor mean, Tensor m2, Tensor counts, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
      "float? momentum, float eps) -> (Tensor mean, Tensor invstd)");
  m.def(
      "batch_norm_elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd) "
      "-> Tensor");
  m.def(
      "batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight, bool input_g, bool weight_g, bool bias_g) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor sum_dy, Tensor sum_dy_xmu, Tensor count) -> Tensor");
  // In-place activated batch norm over processes: the normalized input that a
  // batch_norm_relu_forward_ call (with mean and invstd) overwrote, from its output and kept_input.
  m.def(
      "batch_norm_relu_normalized_input(Tensor output, Tensor kept_input, Tensor? weight, "
      "Tensor? bias, Tensor? residual, Tensor mean, Tensor invstd, float min_val=0., "
      "float? max_val=None, float negative_slope=0.) -> Tensor");
  // The result cache (include/custom_bn/result_cache.h), for the Python package's
  // custom_bn.result_cache.
  m.def("_result_cache_bytes() -> int");
  m.def("_empty_result_cache() -> ()");
  // Debug: the decisions the CPU kernels make for a call of `op` on `input` (csrc/cpu/plan.h),
  // as JSON. For tests and the benchmark; not part of the stable API.
  m.def("_cpu_plan(Tensor input, str op, bool training=True, bool residual=False) -> str");
}
