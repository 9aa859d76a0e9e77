// The per-element math of each CPU pass, defined once for the two-kernel and the
// channel-at-a-time paths, for vectors and scalars alike: v holds the inputs at one position,
// p the channel's parameters. The formulas themselves are csrc/batch_norm_math.h's, shared
// with CUDA; here they only get their vector forms and their argument order.
#pragma once

#include "batch_norm_math.h"
#include "cpu/vec_io.h"

#include <array>
#include <cmath>

namespace custom_bn::cpu::CPU_CAPABILITY {

// The activation and its gradient for vectors; for scalars, the shared definitions. f's
// parameters and kind are uniform over a call, so its branches are taken the same way every
// time.
using custom_bn::activate;
using custom_bn::activation_grad;

using custom_bn::activation_grad_at;

// The smooth activations as torch's CPU kernels vectorize them (csrc/batch_norm_math.h has
// the formulas).
template <typename T>
inline Vectorized<T> activate_smooth(const Vectorized<T>& v, ActivationKind kind) {
  using Vec = Vectorized<T>;
  switch (kind) {
    case ActivationKind::kSilu:
      return v / (Vec(T(1)) + v.neg().exp());
    case ActivationKind::kHardswish:
      return v * minimum(maximum(v + Vec(T(3)), Vec(T(0))), Vec(T(6))) / Vec(T(6));
    default:
      return v * Vec(T(0.5)) * (Vec(T(1)) + (v * Vec(T(M_SQRT1_2))).erf());
  }
}

template <typename T>
inline Vectorized<T> activation_grad_at(const Vectorized<T>& dy, const Vectorized<T>& v,
                                        ActivationKind kind) {
  using Vec = Vectorized<T>;
  const Vec one(T(1));
  switch (kind) {
    case ActivationKind::kSilu: {
      const Vec s = one / (one + v.neg().exp());
      return dy * s * (one + v * (one - s));
    }
    case ActivationKind::kHardswish: {
      const Vec between = dy * (v / Vec(T(3)) + Vec(T(0.5)));
      return Vec::blendv(Vec::blendv(between, dy, v >= Vec(T(3))), Vec(T(0)), v < Vec(T(-3)));
    }
    default: {
      const Vec cdf = Vec(T(0.5)) * (one + (v * Vec(T(M_SQRT1_2))).erf());
      const Vec pdf = Vec(T(M_2_SQRTPI * M_SQRT1_2 * 0.5)) * (Vec(T(-0.5)) * v * v).exp();
      return dy * (cdf + v * pdf);
    }
  }
}

template <typename T>
inline Vectorized<T> activate(const Vectorized<T>& v, const ActivationFunction<T>& f) {
  using Vec = Vectorized<T>;
  if (f.smooth()) return activate_smooth(v, f.kind);
  const Vec lower(f.lower);
  const Vec below = f.slope == T(0) ? lower : lower + Vec(f.slope) * (v - lower);
  const Vec inside = Vec::blendv(v, below, v <= lower);
  return std::isnan(f.upper) ? inside : Vec::blendv(inside, Vec(f.upper), v >= Vec(f.upper));
}

// With slope 0 (ReLU, hardtanh), dy AND the all-ones lanes of output > lower: as a blend, the
// compiler makes dy's load a masked one that waits for output's load and compare; as an AND,
// both loads issue at once.
template <typename T>
inline Vectorized<T> activation_grad(const Vectorized<T>& dy, const Vectorized<T>& output,
                                     const ActivationFunction<T>& f) {
  using Vec = Vectorized<T>;
  const Vec above_lower = output > Vec(f.lower);
  const Vec inside =
      f.slope == T(0) ? dy & above_lower : Vec::blendv(Vec(f.slope) * dy, dy, above_lower);
  return std::isnan(f.upper) ? inside : Vec::blendv(inside, Vec(T(0)), output >= Vec(f.upper));
}

// Normalize: v = (x) or (x, residual), p = (mean, alpha, bias); then the activation f.
constexpr auto kNormalize = [](const auto& v, const auto& p) {
  return normalize(v[0], p[0], p[1], p[2]);
};
template <typename T>
auto normalize_activate(const ActivationFunction<T>& f) {
  return
      [f](const auto& v, const auto& p) { return activate(normalize(v[0], p[0], p[1], p[2]), f); };
}
template <typename T>
auto normalize_add_activate(const ActivationFunction<T>& f) {
  return [f](const auto& v, const auto& p) {
    return activate(normalize(v[0], p[0], p[1], p[2]) + v[1], f);
  };
}

// Gradient sums (dz, dz * (x - mean)), p = (mean): v = (dy, x), or (dy, output, x) with
// dz = activation_grad(dy, output); the last also yields dz to emit.
constexpr auto kGradSums = [](const auto& v, const auto& p) {
  return std::array{v[0], v[0] * (v[1] - p[0])};
};
template <typename T>
auto activation_grad_sums(const ActivationFunction<T>& f) {
  return [f](const auto& v, const auto& p) {
    const auto dz = activation_grad(v[0], v[1], f);
    return std::array{dz, dz * (v[2] - p[0])};
  };
}
// dz is rounded to scalar_t first, as written: the input-gradient pass reads it back, and
// its sums must be of the same values (or their cancellation fails, as torch's does not).
template <typename scalar_t, typename T>
auto activation_grad_sums_and_dz(const ActivationFunction<T>& f) {
  return [f](const auto& v, const auto& p) {
    const auto dz = rounded_to<scalar_t>(activation_grad(v[0], v[1], f));
    return std::array{dz, dz * (v[2] - p[0]), dz};
  };
}

// A smooth activation's gradient sums, v = (dy, x), p = (mean, alpha, bias): dz is dy times
// the activation's derivative at the pre-activation, recomputed; the last also yields dz to
// emit, rounded as activation_grad_sums_and_dz rounds it.
template <typename T>
auto smooth_activation_grad_sums(const ActivationFunction<T>& f) {
  return [kind = f.kind](const auto& v, const auto& p) {
    const auto dz = activation_grad_at(v[0], normalize(v[1], p[0], p[1], p[2]), kind);
    return std::array{dz, dz * (v[1] - p[0])};
  };
}
template <typename scalar_t, typename T>
auto smooth_activation_grad_sums_and_dz(const ActivationFunction<T>& f) {
  return [kind = f.kind](const auto& v, const auto& p) {
    const auto dz =
        rounded_to<scalar_t>(activation_grad_at(v[0], normalize(v[1], p[0], p[1], p[2]), kind));
    return std::array{dz, dz * (v[1] - p[0]), dz};
  };
}

// Input gradient, p = (mean, dy_mean, a, b): v = (dy, x), or (dy, output, x).
constexpr auto kGradInput = [](const auto& v, const auto& p) {
  return custom_bn::grad_input(v[0], v[1], p[0], p[1], p[2], p[3]);
};
template <typename T>
auto activation_grad_input(const ActivationFunction<T>& f) {
  return [f](const auto& v, const auto& p) {
    return custom_bn::grad_input(activation_grad(v[0], v[1], f), v[2], p[0], p[1], p[2], p[3]);
  };
}

// A smooth activation's input gradient, v = (dy, x), p = (mean, dy_mean, a, b, alpha, bias):
// dz recomputed as the sums computed it.
template <typename T>
auto smooth_activation_grad_input(const ActivationFunction<T>& f) {
  return [kind = f.kind](const auto& v, const auto& p) {
    const auto dz = activation_grad_at(v[0], normalize(v[1], p[0], p[4], p[5]), kind);
    return custom_bn::grad_input(dz, v[1], p[0], p[1], p[2], p[3]);
  };
}

}  // namespace custom_bn::cpu::CPU_CAPABILITY
