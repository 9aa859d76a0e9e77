// The loops of the CPU steps of in-place activated batch norm (csrc/cpu/inplace.cpp), over one
// run of a channel (c >= 0: contiguous memory of channel c) or one row (c = -1: consecutive
// channels from i0 % C, channels_last): which values are kept (csrc/inplace.h's rule), the
// gather of the kept input values as the output is written over them, and the recovery of
// x_hat. Which values are kept is as random as the data, so the loops do not branch on it.
// With float on a CPU the AVX-512 kernels run on, they work 16 values at a time
// (csrc/cpu/inplace_avx512.h); otherwise one at a time.
#pragma once

#include "activation.h"
#include "inplace.h"
#include "optional_tensor.h"

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace custom_bn::cpu {

// A per-channel tensor as a vector of acc_t (`fill` for each channel when absent).
template <typename acc_t>
std::vector<acc_t> channel_values(const std::optional<at::Tensor>& t, int64_t channels,
                                  acc_t fill) {
  if (!has(t)) return std::vector<acc_t>(channels, fill);
  const at::Tensor values = t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return {values.data_ptr<acc_t>(), values.data_ptr<acc_t>() + values.numel()};
}

// kept_positions (csrc/inplace.cpp) in the same operations, with what depends on the channel
// alone worked out once per channel.
template <typename acc_t>
struct KeepRule {
  acc_t lower, upper;  // kept at or beyond them
  bool has_bias, has_residual;
  bool any_always;  // a channel keeps every value (the vector loops skip the flags if none)
  std::vector<uint8_t> always;  // kept whatever the value (no residual): weight 0, unsafe bias
  std::vector<acc_t> abs_bias, scale;

  KeepRule(const Activation& act, const std::optional<at::Tensor>& weight,
           const std::optional<at::Tensor>& bias, bool residual, int64_t channels)
      : lower(act.slope == 0.0 ? static_cast<acc_t>(act.lower)
                               : -std::numeric_limits<acc_t>::infinity()),
        upper(std::isnan(act.upper) ? std::numeric_limits<acc_t>::infinity()
                                    : static_cast<acc_t>(act.upper)),
        has_bias(has(bias)),
        has_residual(residual) {
    const acc_t margin = static_cast<acc_t>(kRecoveryMargin);
    const std::vector<acc_t> w = channel_values<acc_t>(weight, channels, acc_t(1));
    const std::vector<acc_t> b = channel_values<acc_t>(bias, channels, acc_t(0));
    for (int64_t c = 0; c < channels; ++c) {
      abs_bias.push_back(std::abs(b[c]));
      scale.push_back(has(weight) ? std::abs(w[c]) * margin : margin);
      always.push_back(has_bias ? !(scale[c] > abs_bias[c]) : has(weight) && w[c] == acc_t(0));
    }
    any_always = std::any_of(always.begin(), always.end(), [](uint8_t a) { return a != 0; });
  }

  // Whether no value can be kept (an identity or LeakyReLU, safe weights, no residual).
  bool keeps_none() const {
    return lower == -std::numeric_limits<acc_t>::infinity() &&
           upper == std::numeric_limits<acc_t>::infinity() && !has_residual && !any_always;
  }

  bool kept(acc_t y, acc_t r, int64_t c) const {
    const bool clipped = (y <= lower) | (y >= upper);
    if (!has_residual) return clipped | static_cast<bool>(always[c]);
    const acc_t offset = has_bias ? abs_bias[c] + std::abs(r) : std::abs(r);
    return clipped | !(scale[c] > offset);
  }
};

// condition ? a : b without a branch.
template <typename T>
T select(bool condition, T a, T b) {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  Bits x, y;
  std::memcpy(&x, &a, sizeof(T));
  std::memcpy(&y, &b, sizeof(T));
  const Bits mask = Bits(0) - static_cast<Bits>(condition);
  const Bits bits = (x & mask) | (y & ~mask);
  T result;
  std::memcpy(&result, &bits, sizeof(T));
  return result;
}

// What recovering x_hat reads per channel.
template <typename scalar_t>
struct RecoveryParams {
  std::vector<scalar_t> inverse_weight, bias, mean, invstd;
  scalar_t lower, inverse_slope;  // act^-1 below lower: (y - lower) * inverse_slope + lower
  bool inverts_below;             // slope 0 keeps every value below lower instead

  RecoveryParams(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& mean, const at::Tensor& invstd, const Activation& act,
                 int64_t channels)
      : inverse_weight(channel_values<scalar_t>(weight, channels, scalar_t(1))),
        bias(channel_values<scalar_t>(bias, channels, scalar_t(0))),
        mean(channel_values<scalar_t>(mean, channels, scalar_t(0))),
        invstd(channel_values<scalar_t>(invstd, channels, scalar_t(1))),
        lower(static_cast<scalar_t>(act.lower)),
        inverse_slope(scalar_t(1)),
        inverts_below(act.slope != 0.0) {
    for (scalar_t& w : inverse_weight) w = scalar_t(1) / w;
    // Below lower the slope is 0 (kept), 1 (the identity) or inverted.
    if (act.slope != 0.0) inverse_slope = static_cast<scalar_t>(1.0 / act.slope);
  }
};

}  // namespace custom_bn::cpu

#include "cpu/inplace_avx512.h"

namespace custom_bn::cpu {

// How many of [i0, i1) are kept, in a run (channel c >= 0) or a row (c = -1); y holds the
// output values of [i0, i1) (y[0] is i0's).
template <typename scalar_t>
C10_NOINLINE int64_t kept_count(const KeepRule<scalar_t>& rule, const scalar_t* y,
                                const scalar_t* r, int64_t i0, int64_t i1, int64_t c,
                                int64_t channels) {
  if (c >= 0 && !rule.has_residual && rule.always[c]) return i1 - i0;
#if defined(CUSTOM_BN_INPLACE_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (inplace_avx512()) {
      return avx512::kept_count(rule, y, r, i0, i1, {c < 0, c >= 0 ? c : i0 % channels});
    }
  }
#endif
  const scalar_t lower = rule.lower, upper = rule.upper;
  const int64_t n = i1 - i0;
  int64_t count = 0;
  if (c >= 0 && !rule.has_residual) {
    for (int64_t k = 0; k < n; ++k) count += (y[k] <= lower) | (y[k] >= upper);
    return count;
  }
  const int64_t c0 = c >= 0 ? c : i0 % channels;
  for (int64_t k = 0; k < n; ++k) {
    count += rule.kept(y[k], r ? r[i0 + k] : scalar_t(0), c >= 0 ? c : c0 + k);
  }
  return count;
}

// Stores the kept values of x[i0, i1) at kept[next...] and writes the output values y (y[0] is
// i0's, as kept_count reads them) over x; returns the next position. The scalar loops store
// every value and advance past the kept ones; a store at or beyond `limit` (where the next
// chunk's kept values start, written by another thread) goes to a local instead.
template <typename scalar_t>
C10_NOINLINE int64_t gather_kept(const KeepRule<scalar_t>& rule, scalar_t* x, const scalar_t* y,
                                 const scalar_t* r, scalar_t* kept, int64_t next, int64_t limit,
                                 int64_t i0, int64_t i1, int64_t c, int64_t channels) {
  const int64_t n = i1 - i0;
  if (c >= 0 && !rule.has_residual && rule.always[c]) {
    std::copy(x + i0, x + i1, kept + next);
    std::copy(y, y + n, x + i0);
    return next + n;
  }
#if defined(CUSTOM_BN_INPLACE_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (inplace_avx512()) {
      return avx512::gather_kept(rule, x, y, r, kept, next, i0, i1,
                                 {c < 0, c >= 0 ? c : i0 % channels});
    }
  }
#endif
  int64_t at = next;  // a local the compiler keeps in a register
  scalar_t sink;
  scalar_t* xs = x + i0;
  if (c >= 0 && !rule.has_residual) {
    const scalar_t lower = rule.lower, upper = rule.upper;
    for (int64_t k = 0; k < n; ++k) {
      const scalar_t yv = y[k];
      *(at < limit ? kept + at : &sink) = xs[k];
      xs[k] = yv;
      at += (yv <= lower) | (yv >= upper);
    }
    return at;
  }
  const int64_t c0 = c >= 0 ? c : i0 % channels;
  for (int64_t k = 0; k < n; ++k) {
    const scalar_t yv = y[k];
    *(at < limit ? kept + at : &sink) = xs[k];
    xs[k] = yv;
    at += rule.kept(yv, r ? r[i0 + k] : scalar_t(0), c >= 0 ? c : c0 + k);
  }
  return at;
}

// x_hat over [i0, i1), into out[0, i1 - i0): from kept[next...] where kept, else recovered from
// the output; returns the next kept position. Free of branches on the data: the kept array is
// read at a valid index whether the value is kept or not.
template <typename scalar_t>
C10_NOINLINE int64_t recover(const KeepRule<scalar_t>& rule, const scalar_t* y, const scalar_t* r,
                             const scalar_t* kept, int64_t last_kept, int64_t next, int64_t i0,
                             int64_t i1, int64_t c, const RecoveryParams<scalar_t>& p,
                             scalar_t* out) {
  if (c >= 0 && !rule.has_residual && rule.always[c]) {
    const scalar_t mean = p.mean[c], invstd = p.invstd[c];
    for (int64_t i = i0; i < i1; ++i) out[i - i0] = (kept[next + i - i0] - mean) * invstd;
    return next + (i1 - i0);
  }
  // Per-channel values: one channel for a run (stride 0), consecutive ones for a row.
  const int64_t c0 = c >= 0 ? c : i0 % static_cast<int64_t>(p.mean.size());
#if defined(CUSTOM_BN_INPLACE_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (inplace_avx512())
      return avx512::recover(rule, y, r, kept, next, i0, i1, {c < 0, c0}, p, out);
  }
#endif
  const scalar_t lower = p.lower, inverse_slope = p.inverse_slope;
  const int64_t step = c >= 0 ? 0 : 1;
  const scalar_t* bias = p.bias.data() + c0;
  const scalar_t* inverse_weight = p.inverse_weight.data() + c0;
  const scalar_t* mean = p.mean.data() + c0;
  const scalar_t* invstd = p.invstd.data() + c0;
  int64_t at = next;
  for (int64_t i = i0, k = 0; i < i1; ++i, k += step) {
    const scalar_t yv = y[i], rv = r ? r[i] : scalar_t(0);
    const bool is_kept = rule.kept(yv, rv, c0 + k);
    const scalar_t xv = kept[std::min(at, last_kept)];
    at += is_kept;
    const scalar_t z = select(yv <= lower, (yv - lower) * inverse_slope + lower, yv);
    out[i - i0] =
        select(is_kept, (xv - mean[k]) * invstd[k], (z - bias[k] - rv) * inverse_weight[k]);
  }
  return at;
}

}  // namespace custom_bn::cpu
