// The fused ops' activation argument: its names and checks, and the activation in
// differentiable ATen ops for what the kernels do not cover.
#include "activation.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/hardswish.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/where.h>
#include <c10/util/Exception.h>

#include <limits>
#include <string>

namespace custom_bn {

namespace {

struct NamedActivation {
  const char* name;
  ActivationKind kind;
};
constexpr NamedActivation kActivations[] = {{"piecewise_linear", ActivationKind::kPiecewiseLinear},
                                            {"silu", ActivationKind::kSilu},
                                            {"hardswish", ActivationKind::kHardswish},
                                            {"gelu", ActivationKind::kGelu}};

}  // namespace

Activation checked_activation(const char* op, double min_val, std::optional<double> max_val,
                              double negative_slope, c10::string_view activation) {
  const NamedActivation* named = nullptr;
  for (const NamedActivation& candidate : kActivations) {
    if (activation == candidate.name) named = &candidate;
  }
  TORCH_CHECK_VALUE(named != nullptr, op,
                    ": activation must be one of 'piecewise_linear', 'silu', 'hardswish' or "
                    "'gelu', but got '",
                    std::string(activation.data(), activation.size()), "'");
  if (named->kind != ActivationKind::kPiecewiseLinear) {
    TORCH_CHECK_VALUE(min_val == 0.0 && !max_val && negative_slope == 0.0, op,
                      ": min_val, max_val and negative_slope describe a piecewise-linear "
                      "activation; with activation='",
                      named->name, "' they must keep their defaults (0, None, 0), but got (",
                      min_val, ", ", max_val ? c10::str(*max_val) : std::string("None"), ", ",
                      negative_slope, ")");
    return {0.0, std::numeric_limits<double>::quiet_NaN(), 0.0, named->kind};
  }
  TORCH_CHECK_VALUE(std::isfinite(min_val), op, ": min_val must be finite, but got ", min_val);
  TORCH_CHECK_VALUE(!max_val || std::isfinite(*max_val), op,
                    ": max_val must be finite or None, but got ", *max_val);
  TORCH_CHECK_VALUE(!max_val || min_val <= *max_val, op,
                    ": min_val cannot be greater than max_val, but got min_val=", min_val,
                    " and max_val=", *max_val);
  TORCH_CHECK_VALUE(std::isfinite(negative_slope) && negative_slope >= 0.0, op,
                    ": negative_slope must be finite and >= 0 (the backward reads the "
                    "activation's gradient from the output), but got ",
                    negative_slope);
  return {min_val, max_val ? *max_val : std::numeric_limits<double>::quiet_NaN(), negative_slope};
}

const char* activation_name(const Activation& act) {
  for (const NamedActivation& candidate : kActivations) {
    if (candidate.kind == act.kind) return candidate.name;
  }
  return "piecewise_linear";
}

void check_activation_residual(const char* op, const Activation& act, bool has_residual) {
  TORCH_CHECK_VALUE(!act.smooth() || !has_residual, op, ": activation='", activation_name(act),
                    "' takes no residual (its backward recomputes the pre-activation from the "
                    "input, which a residual would have to be kept for), but got a residual "
                    "tensor");
}

at::Tensor activated(const at::Tensor& v, const Activation& f) {
  switch (f.kind) {
    case ActivationKind::kSilu:
      return at::silu(v);
    case ActivationKind::kHardswish:
      return at::hardswish(v);
    case ActivationKind::kGelu:
      return at::gelu(v);
    default:
      break;
  }
  at::Tensor out = f.slope == 0.0 ? at::clamp(v, f.lower)
                                  : at::where(v <= f.lower, (v - f.lower) * f.slope + f.lower, v);
  return std::isnan(f.upper) ? out : at::clamp(out, std::nullopt, f.upper);
}

}  // namespace custom_bn
