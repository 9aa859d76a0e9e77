// The math of batch normalization, written once and shared by the CPU and CUDA kernels.
//
//   forward:   y = (x - mean) * alpha + bias,      alpha = invstd * weight
//   backward:  grad_x = a * (dy - dy_mean) + b * (x - mean)   (per-channel a, b, dy_mean)
// Both subtract the means before scaling: folded forms such as alpha * x + (bias - mean *
// alpha) cancel catastrophically when |mean| * invstd is large (a near-constant channel).
//   running:   running = (1 - m) * running + m * batch   (running_var takes the unbiased variance)
//   merge:     parallel Welford (Chan et al.) of (count, mean, M2) triples
//   fused:     z = act(y + residual); its gradient dz = act'(.) * dy, read from the output z
//              when act is piecewise linear (monotone), else taken at y recomputed from x
//              (smooth act, no residual); then as above
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace custom_bn {

// Statistics of a set of values: how many, their mean, and the sum of squared deviations (M2).
template <typename T>
struct WelfordStats {
  T count;
  T mean;
  T m2;
};

// Merges the statistics of two disjoint sets. Either may be empty (count 0).
template <typename T>
C10_HOST_DEVICE inline WelfordStats<T> welford_merge(const WelfordStats<T>& a,
                                                     const WelfordStats<T>& b) {
  const T count = a.count + b.count;
  const T b_share = count > T(0) ? b.count / count : T(0);
  const T delta = b.mean - a.mean;
  return {count, a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.count * b_share};
}

// A part's contribution to the M2 of a whole with mean whole_mean (the law of total
// variance): M2 of the whole = sum over its parts of m2_about(...). Needs the whole's mean
// first, but no division per part, unlike welford_merge.
template <typename T>
C10_HOST_DEVICE inline T m2_about(T part_m2, T part_count, T part_mean, T whole_mean) {
  const T offset = part_mean - whole_mean;
  return part_m2 + part_count * offset * offset;
}

template <typename T>
C10_HOST_DEVICE inline T invstd_from_var(T biased_var, double eps) {
  return T(1) / ::sqrt(biased_var + static_cast<T>(eps));
}

// The variance the running estimate tracks: M2 / (n - 1).
template <typename T>
C10_HOST_DEVICE inline T unbiased_var(T m2, T count) {
  return m2 / (count - T(1));
}

template <typename T>
C10_HOST_DEVICE inline T running_update(T running, T batch, T momentum) {
  return (T(1) - momentum) * running + momentum * batch;
}

// The normalize-and-scale pass, for scalars and for vector types alike.
template <typename T>
C10_HOST_DEVICE inline T normalize(T x, T mean, T alpha, T bias) {
  return (x - mean) * alpha + bias;
}

// The input gradient from per-channel coefficients, for scalars and vector types alike.
template <typename T>
C10_HOST_DEVICE inline T grad_input(T dy, T x, T mean, T dy_mean, T a, T b) {
  return a * (dy - dy_mean) + b * (x - mean);
}

// The fused epilogue's activation. Piecewise linear and monotone (ReLU, ReLU6 and hardtanh,
// LeakyReLU, identity): inside (lower, upper) the identity; at or below lower,
// lower + slope * (v - lower) (lower itself when slope is 0, even for v = -inf); at or above
// upper, upper. Without an upper bound, upper is NaN, which every comparison fails.
//   relu: (0, none, 0)  hardtanh(a, b): (a, b, 0)  leaky_relu(s): (0, none, s)
//   identity: (0, none, 1)
// Or smooth (SiLU, Hardswish, GELU), which the parameters do not describe. Those are not
// invertible from their output, so their gradient is taken at the pre-activation, which the
// backward recomputes from the input (activation_grad_at).
enum class ActivationKind : int { kPiecewiseLinear, kSilu, kHardswish, kGelu };

template <typename T>
struct ActivationFunction {
  T lower;
  T upper;
  T slope;
  ActivationKind kind = ActivationKind::kPiecewiseLinear;

  C10_HOST_DEVICE bool smooth() const { return kind != ActivationKind::kPiecewiseLinear; }

  template <typename U>
  C10_HOST_DEVICE ActivationFunction<U> to() const {
    return {static_cast<U>(lower), static_cast<U>(upper), static_cast<U>(slope), kind};
  }
};

// The smooth activations and their derivatives, in the form of torch's own kernels:
//   silu(v) = v / (1 + exp(-v)),  silu'(v) = s * (1 + v * (1 - s)) with s = sigmoid(v)
//   hardswish(v) = v * min(max(v + 3, 0), 6) / 6,  hardswish'(v) = 0 below -3, 1 at or above 3,
//   v / 3 + 1/2 between
//   gelu(v) = v / 2 * (1 + erf(v / sqrt(2))),  gelu'(v) = cdf(v) + v * pdf(v)
template <typename T>
C10_HOST_DEVICE inline T activate_smooth(T v, ActivationKind kind) {
  switch (kind) {
    case ActivationKind::kSilu:
      return v / (T(1) + ::exp(-v));
    case ActivationKind::kHardswish:
      return v * ::fmin(::fmax(v + T(3), T(0)), T(6)) / T(6);
    default:
      return v * T(0.5) * (T(1) + ::erf(v * T(M_SQRT1_2)));
  }
}

template <typename T>
C10_HOST_DEVICE inline T activation_grad_at(T dy, T v, ActivationKind kind) {
  switch (kind) {
    case ActivationKind::kSilu: {
      const T s = T(1) / (T(1) + ::exp(-v));
      return dy * s * (T(1) + v * (T(1) - s));
    }
    case ActivationKind::kHardswish:
      return v < T(-3) ? T(0) : (v >= T(3) ? dy : dy * (v / T(3) + T(0.5)));
    default: {
      const T cdf = T(0.5) * (T(1) + ::erf(v * T(M_SQRT1_2)));
      const T pdf = T(M_2_SQRTPI * M_SQRT1_2 * 0.5) * ::exp(T(-0.5) * v * v);
      return dy * (cdf + v * pdf);
    }
  }
}

// NaN passes through, as in torch.relu, hardtanh, leaky_relu and the smooth ones.
template <typename T>
C10_HOST_DEVICE inline T activate(T v, const ActivationFunction<T>& f) {
  if (f.smooth()) return activate_smooth(v, f.kind);
  const T below = f.slope == T(0) ? f.lower : f.lower + f.slope * (v - f.lower);
  const T inside = v <= f.lower ? below : v;
  return v >= f.upper ? f.upper : inside;
}

// A piecewise-linear activation's gradient read from its output, as torch's
// threshold_backward, leaky_relu_backward and hardtanh_backward read it from their input: dy
// inside (lower, upper), slope * dy at or below lower (0 when slope is 0, even for an infinite
// dy), 0 at or above upper. A NaN output counts as below.
template <typename T>
C10_HOST_DEVICE inline T activation_grad(T dy, T output, const ActivationFunction<T>& f) {
  const T below = f.slope == T(0) ? T(0) : f.slope * dy;
  const T inside = output > f.lower ? dy : below;
  return output >= f.upper ? T(0) : inside;
}

// Per-channel coefficients of the input gradient: grad_x = a * (dy - dy_mean) + b * (x - mean).
template <typename T>
struct GradInputCoefficients {
  T a;
  T b;
  T dy_mean;
};

// Training: the batch statistics depend on x, so
//   grad_x = w * invstd * (dy - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n).
template <typename T>
C10_HOST_DEVICE inline GradInputCoefficients<T> grad_input_coefficients_training(T invstd, T weight,
                                                                                 T sum_dy,
                                                                                 T sum_dy_xmu,
                                                                                 T count) {
  const T scale = invstd * weight;
  const T k = sum_dy_xmu / count * invstd * invstd;
  return {scale, -k * scale, sum_dy / count};
}

// Eval: the statistics are constants, so grad_x = w * invstd * dy.
template <typename T>
C10_HOST_DEVICE inline GradInputCoefficients<T> grad_input_coefficients_eval(T invstd, T weight) {
  return {invstd * weight, T(0), T(0)};
}

}  // namespace custom_bn
