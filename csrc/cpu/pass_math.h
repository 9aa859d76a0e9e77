// The per-element math of each CPU pass, defined once for the two-kernel and the
// channel-at-a-time paths, for vectors and scalars alike: v holds the inputs at one position,
// p the channel's parameters. The formulas themselves are csrc/batch_norm_math.h's, shared
// with CUDA; here they only get their vector forms and their argument order.
#pragma once

#include "batch_norm_math.h"
#include "cpu/vec_io.h"

#include <array>

namespace custom_bn::cpu::CPU_CAPABILITY {

// ReLU and its gradient for vectors; for scalars, the shared definitions.
using custom_bn::relu;
using custom_bn::relu_grad;

template <typename T>
inline Vectorized<T> relu(const Vectorized<T>& v) {
  return at::vec::maximum(v, Vectorized<T>(T(0)));  // propagates NaN, as relu(T) does
}

// dy AND the all-ones lanes of output > 0: as a blend, the compiler makes dy's load a masked
// one that waits for output's load and compare; as an AND, both loads issue at once.
template <typename T>
inline Vectorized<T> relu_grad(const Vectorized<T>& dy, const Vectorized<T>& output) {
  return dy & (output > Vectorized<T>(T(0)));
}

// Normalize: v = (x) or (x, residual), p = (mean, alpha, bias).
constexpr auto kNormalize = [](const auto& v, const auto& p) {
  return normalize(v[0], p[0], p[1], p[2]);
};
constexpr auto kNormalizeRelu = [](const auto& v, const auto& p) {
  return relu(normalize(v[0], p[0], p[1], p[2]));
};
constexpr auto kNormalizeAddRelu = [](const auto& v, const auto& p) {
  return relu(normalize(v[0], p[0], p[1], p[2]) + v[1]);
};

// Gradient sums (dz, dz * (x - mean)), p = (mean): v = (dy, x), or (dy, output, x) with
// dz = relu_grad(dy, output); the last also yields dz to emit.
constexpr auto kGradSums = [](const auto& v, const auto& p) {
  return std::array{v[0], v[0] * (v[1] - p[0])};
};
constexpr auto kReluGradSums = [](const auto& v, const auto& p) {
  const auto dz = relu_grad(v[0], v[1]);
  return std::array{dz, dz * (v[2] - p[0])};
};
constexpr auto kReluGradSumsAndMasked = [](const auto& v, const auto& p) {
  const auto dz = relu_grad(v[0], v[1]);
  return std::array{dz, dz * (v[2] - p[0]), dz};
};

// Input gradient, p = (mean, dy_mean, a, b): v = (dy, x), or (dy, output, x).
constexpr auto kGradInput = [](const auto& v, const auto& p) {
  return custom_bn::grad_input(v[0], v[1], p[0], p[1], p[2], p[3]);
};
constexpr auto kReluGradInput = [](const auto& v, const auto& p) {
  return custom_bn::grad_input(relu_grad(v[0], v[1]), v[2], p[0], p[1], p[2], p[3]);
};

}  // namespace custom_bn::cpu::CPU_CAPABILITY
