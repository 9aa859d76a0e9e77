// The fused ops' activation arguments (min_val, max_val, negative_slope: ATen's hardtanh and
// leaky_relu parameters) as the kernels' piecewise-linear function (csrc/batch_norm_math.h).
#pragma once

#include "batch_norm_math.h"

#include <cmath>
#include <optional>

namespace custom_bn {

using Activation = PiecewiseLinear<double>;

// The activation of a call, checked before anything is written: finite parameters,
// min_val <= max_val (as hardtanh asks) and negative_slope >= 0, since the backward reads the
// gradient from the output and a negative slope would make that ambiguous (torch refuses it
// for its in-place leaky_relu's backward for the same reason).
Activation checked_activation(const char* op, double min_val, std::optional<double> max_val,
                              double negative_slope);

// The max_val argument an activation came from: none when it has no upper bound.
inline std::optional<double> upper_bound(const Activation& act) {
  return std::isnan(act.upper) ? std::nullopt : std::optional<double>(act.upper);
}

}  // namespace custom_bn
