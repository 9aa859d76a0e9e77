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
// parameters are uniform over a call, so its branches are taken the same way every time.
using custom_bn::activate;
using custom_bn::activation_grad;

template <typename T>
inline Vectorized<T> activate(const Vectorized<T>& v, const PiecewiseLinear<T>& f) {
  using Vec = Vectorized<T>;
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
                                     const PiecewiseLinear<T>& f) {
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
auto normalize_activate(const PiecewiseLinear<T>& f) {
  return
      [f](const auto& v, const auto& p) { return activate(normalize(v[0], p[0], p[1], p[2]), f); };
}
template <typename T>
auto normalize_add_activate(const PiecewiseLinear<T>& f) {
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
auto activation_grad_sums(const PiecewiseLinear<T>& f) {
  return [f](const auto& v, const auto& p) {
    const auto dz = activation_grad(v[0], v[1], f);
    return std::array{dz, dz * (v[2] - p[0])};
  };
}
template <typename T>
auto activation_grad_sums_and_dz(const PiecewiseLinear<T>& f) {
  return [f](const auto& v, const auto& p) {
    const auto dz = activation_grad(v[0], v[1], f);
    return std::array{dz, dz * (v[2] - p[0]), dz};
  };
}

// Input gradient, p = (mean, dy_mean, a, b): v = (dy, x), or (dy, output, x).
constexpr auto kGradInput = [](const auto& v, const auto& p) {
  return custom_bn::grad_input(v[0], v[1], p[0], p[1], p[2], p[3]);
};
template <typename T>
auto activation_grad_input(const PiecewiseLinear<T>& f) {
  return [f](const auto& v, const auto& p) {
    return custom_bn::grad_input(activation_grad(v[0], v[1], f), v[2], p[0], p[1], p[2], p[3]);
  };
}

}  // namespace custom_bn::cpu::CPU_CAPABILITY
