// The fused ops' activation arguments as the kernels' activation function
// (csrc/batch_norm_math.h): activation="piecewise_linear" with min_val, max_val and
// negative_slope (ATen's hardtanh and leaky_relu parameters), or one of the smooth ones,
// "silu", "hardswish" and "gelu" (torch's, with approximate="none").
#pragma once

#include "batch_norm_math.h"

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>

namespace custom_bn {

using Activation = ActivationFunction<double>;

// The activation of a call, checked before anything is written: a known name; for a
// piecewise-linear one finite parameters, min_val <= max_val (as hardtanh asks) and
// negative_slope >= 0, since the backward reads the gradient from the output and a negative
// slope would make that ambiguous (torch refuses it for its in-place leaky_relu's backward for
// the same reason); for a smooth one, the parameters left at their defaults.
Activation checked_activation(const char* op, double min_val, std::optional<double> max_val,
                              double negative_slope, c10::string_view activation);

// The max_val argument an activation came from: none when it has no upper bound.
inline std::optional<double> upper_bound(const Activation& act) {
  return std::isnan(act.upper) ? std::nullopt : std::optional<double>(act.upper);
}

// The activation argument an activation came from.
const char* activation_name(const Activation& act);

// A smooth activation's gradient is taken at the pre-activation, which the backward
// recomputes from the input; with a residual it would have to keep the residual too, so the
// fused ops refuse that pair (ValueError).
void check_activation_residual(const char* op, const Activation& act, bool has_residual);

// Whether a backward on the CPU writes a smooth activation's dz once, in the reduction, and
// reads it back for the input gradient (SiLU, GELU: their exp and erf cost more than the
// extra tensor), rather than recomputing it in each pass, which may then go a channel at a
// time (Hardswish: compares and a multiply). docs/perf.md row 52 has the measurements.
inline bool writes_smooth_dz(const Activation& act) {
  return act.kind == ActivationKind::kSilu || act.kind == ActivationKind::kGelu;
}

// The activation in differentiable ATen ops (torch's own for the smooth ones).
at::Tensor activated(const at::Tensor& v, const Activation& f);

}  // namespace custom_bn
