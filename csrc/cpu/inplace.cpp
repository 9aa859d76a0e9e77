// The CPU steps of in-place activated batch norm (csrc/inplace.h): each walks memory in chunks,
// in parallel, once to count the kept positions of each chunk and once to write, over an input
// that is dense and shares its strides with the output and the residual (the layouts models
// train in: contiguous, channels_last). Any other layout takes the generic steps, which keep
// the same values in the same order.
//
// Memory is walked in runs of one channel (contiguous: a plane) or in rows of every channel
// (channels_last), so that the per-channel values are constants or arrays of an inner loop
// the compiler vectorizes; which values are kept is as random as the data, so the loops that
// gather and scatter them are free of branches on it.
#include "inplace.h"
#include "channel_stats.h"
#include "op_params.h"
#include "optional_tensor.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace custom_bn::cpu {
namespace {

constexpr int64_t kChunk = int64_t{1} << 15;

bool walks_memory(const at::Tensor& input, const at::Tensor& other,
                  const std::optional<at::Tensor>& residual) {
  return input.is_non_overlapping_and_dense() && other.strides() == input.strides() &&
         (!has(residual) || residual->strides() == input.strides());
}

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

// The memory of a dense (N, C, *) tensor in chunks of kChunk elements, each walked as runs
// f(i0, i1, c) of one channel c (stride > 1) or as runs f(i0, i1, -1) of consecutive channels
// starting at channel i0 % C (channels_last, stride 1).
struct Walk {
  int64_t numel, channels, stride;

  explicit Walk(const at::Tensor& t)
      : numel(t.numel()), channels(t.size(1)), stride(t.size(1) > 1 ? t.stride(1) : 1) {}

  int64_t chunks() const { return (numel + kChunk - 1) / kChunk; }

  template <typename F>
  void chunk(int64_t index, const F& f) const {
    const int64_t begin = index * kChunk, end = std::min(numel, begin + kChunk);
    if (stride == 1) {
      for (int64_t i = begin; i < end;) {
        const int64_t row_end = std::min(end, i + channels - i % channels);
        f(i, row_end, int64_t{-1});
        i = row_end;
      }
      return;
    }
    int64_t c = (begin / stride) % channels;
    for (int64_t i = begin; i < end;) {
      const int64_t run_end = std::min(end, i + stride - i % stride);
      f(i, run_end, c);
      i = run_end;
      if (++c == channels) c = 0;
    }
  }
};

// How many of [i0, i1) are kept, in a run (channel c >= 0) or a row (c = -1).
template <typename scalar_t>
C10_NOINLINE int64_t kept_count(const KeepRule<scalar_t>& rule, const scalar_t* y,
                                const scalar_t* r, int64_t i0, int64_t i1, int64_t c,
                                int64_t channels) {
  if (c >= 0 && !rule.has_residual && rule.always[c]) return i1 - i0;
  const scalar_t lower = rule.lower, upper = rule.upper;
  int64_t count = 0;
  if (c >= 0 && !rule.has_residual) {
    for (int64_t i = i0; i < i1; ++i) count += (y[i] <= lower) | (y[i] >= upper);
    return count;
  }
  const int64_t c0 = c >= 0 ? c : i0 % channels;
  for (int64_t i = i0; i < i1; ++i) {
    count += rule.kept(y[i], r ? r[i] : scalar_t(0), c >= 0 ? c : c0 + (i - i0));
  }
  return count;
}

// The kept positions before each chunk (and the total, last).
template <typename scalar_t>
std::vector<int64_t> kept_offsets(const KeepRule<scalar_t>& rule, const Walk& walk,
                                  const scalar_t* y, const scalar_t* r) {
  const int64_t chunks = walk.chunks();
  std::vector<int64_t> offsets(chunks + 1, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t index = first; index < last; ++index) {
      int64_t count = 0;
      walk.chunk(index, [&](int64_t i0, int64_t i1, int64_t c) {
        count += kept_count(rule, y, r, i0, i1, c, walk.channels);
      });
      offsets[index + 1] = count;
    }
  });
  for (int64_t index = 0; index < chunks; ++index) offsets[index + 1] += offsets[index];
  return offsets;
}

// Stores x[i0, i1) at kept[next...], advancing past the kept ones, and writes y over x; returns
// the next position.
template <typename scalar_t>
C10_NOINLINE int64_t gather_kept(const KeepRule<scalar_t>& rule, scalar_t* x, const scalar_t* y,
                                 const scalar_t* r, scalar_t* kept, int64_t next, int64_t i0,
                                 int64_t i1, int64_t c, int64_t channels) {
  if (c >= 0 && !rule.has_residual && rule.always[c]) {
    std::copy(x + i0, x + i1, kept + next);
    std::copy(y + i0, y + i1, x + i0);
    return next + (i1 - i0);
  }
  int64_t at = next;  // a local the compiler keeps in a register
  if (c >= 0 && !rule.has_residual) {
    const scalar_t lower = rule.lower, upper = rule.upper;
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t yv = y[i];
      kept[at] = x[i];
      x[i] = yv;
      at += (yv <= lower) | (yv >= upper);
    }
    return at;
  }
  const int64_t c0 = c >= 0 ? c : i0 % channels;
  for (int64_t i = i0; i < i1; ++i) {
    const scalar_t yv = y[i];
    kept[at] = x[i];
    x[i] = yv;
    at += rule.kept(yv, r ? r[i] : scalar_t(0), c >= 0 ? c : c0 + (i - i0));
  }
  return at;
}

at::Tensor write_output_keeping_input(at::Tensor& input, const at::Tensor& output,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual,
                                      const Activation& act) {
  if (!walks_memory(input, output, residual) || keeps_every_value(input.scalar_type())) {
    return kGenericInplaceSteps.write_output_keeping_input(input, output, weight, bias, residual,
                                                           act);
  }
  at::Tensor kept_input;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_relu_forward_", [&] {
    const Walk walk(input);
    const KeepRule<scalar_t> rule(act, weight, bias, has(residual), walk.channels);
    scalar_t* x = input.data_ptr<scalar_t>();
    const scalar_t* y = output.const_data_ptr<scalar_t>();
    const scalar_t* r = has(residual) ? residual->const_data_ptr<scalar_t>() : nullptr;
    const std::vector<int64_t> offsets = kept_offsets(rule, walk, y, r);
    // One spare value: the loop stores every value and advances past the kept ones.
    kept_input = at::empty({offsets.back() + 1}, input.options());
    scalar_t* kept = kept_input.data_ptr<scalar_t>();
    kept_input = kept_input.narrow(0, 0, offsets.back());
    at::parallel_for(0, walk.chunks(), 1, [&](int64_t first, int64_t last) {
      for (int64_t index = first; index < last; ++index) {
        int64_t next = offsets[index];
        walk.chunk(index, [&](int64_t i0, int64_t i1, int64_t c) {
          next = gather_kept(rule, x, y, r, kept, next, i0, i1, c, walk.channels);
        });
      }
    });
  });
  return kept_input;
}

// What recovering x_hat reads per channel.
template <typename scalar_t>
struct RecoveryParams {
  std::vector<scalar_t> inverse_weight, bias, mean, invstd;
  scalar_t lower, inverse_slope;  // act^-1 below lower: (y - lower) * inverse_slope + lower
};

// x_hat over [i0, i1): from kept[next...] where kept, else recovered from the output; returns
// the next kept position. Free of branches on the data: the kept array is read at a valid
// index whether the value is kept or not.
template <typename scalar_t>
C10_NOINLINE int64_t recover(const KeepRule<scalar_t>& rule, const scalar_t* y, const scalar_t* r,
                             const scalar_t* kept, int64_t last_kept, int64_t next, int64_t i0,
                             int64_t i1, int64_t c, const RecoveryParams<scalar_t>& p,
                             scalar_t* out) {
  if (c >= 0 && !rule.has_residual && rule.always[c]) {
    const scalar_t mean = p.mean[c], invstd = p.invstd[c];
    for (int64_t i = i0; i < i1; ++i) out[i] = (kept[next + i - i0] - mean) * invstd;
    return next + (i1 - i0);
  }
  const scalar_t lower = p.lower, inverse_slope = p.inverse_slope;
  // Per-channel values: one channel for a run (stride 0), consecutive ones for a row.
  const int64_t c0 = c >= 0 ? c : i0 % static_cast<int64_t>(p.mean.size());
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
    out[i] = select(is_kept, (xv - mean[k]) * invstd[k], (z - bias[k] - rv) * inverse_weight[k]);
  }
  return at;
}

at::Tensor normalized_input(const at::Tensor& output, const at::Tensor& kept_input,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, const at::Tensor& mean,
                            const at::Tensor& invstd, const Activation& act) {
  // Low precision keeps every input value and does not come here (keeps_every_value).
  if (!walks_memory(output, output, residual) || keeps_every_value(output.scalar_type())) {
    return kGenericInplaceSteps.normalized_input(output, kept_input, weight, bias, residual, mean,
                                                 invstd, act);
  }
  const at::Tensor x_hat = at::empty_like(output);
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "batch_norm_relu_inplace_backward", [&] {
    const Walk walk(output);
    const int64_t channels = walk.channels;
    const KeepRule<scalar_t> rule(act, weight, bias, has(residual), channels);
    RecoveryParams<scalar_t> params{channel_values<scalar_t>(weight, channels, scalar_t(1)),
                                    channel_values<scalar_t>(bias, channels, scalar_t(0)),
                                    channel_values<scalar_t>(mean, channels, scalar_t(0)),
                                    channel_values<scalar_t>(invstd, channels, scalar_t(1)),
                                    static_cast<scalar_t>(act.lower),
                                    scalar_t(1)};
    for (scalar_t& w : params.inverse_weight) w = scalar_t(1) / w;
    // Below lower the slope is 0 (kept), 1 (the identity) or inverted.
    if (act.slope != 0.0) params.inverse_slope = static_cast<scalar_t>(1.0 / act.slope);
    const scalar_t* y = output.const_data_ptr<scalar_t>();
    const scalar_t* r = has(residual) ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = x_hat.data_ptr<scalar_t>();
    const std::vector<int64_t> offsets = kept_offsets(rule, walk, y, r);
    check_kept_count("custom_bn::batch_norm_relu_inplace_backward", offsets.back(), kept_input);
    const int64_t last_kept = std::max<int64_t>(kept_input.numel() - 1, 0);
    const scalar_t no_value = scalar_t(0);
    const scalar_t* kept =
        kept_input.numel() > 0 ? kept_input.const_data_ptr<scalar_t>() : &no_value;
    at::parallel_for(0, walk.chunks(), 1, [&](int64_t first, int64_t last) {
      for (int64_t index = first; index < last; ++index) {
        int64_t next = offsets[index];
        walk.chunk(index, [&](int64_t i0, int64_t i1, int64_t c) {
          next = recover(rule, y, r, kept, last_kept, next, i0, i1, c, params, out);
        });
      }
    });
  });
  return x_hat;
}

}  // namespace

// Outside the anonymous namespace: a template argument must have linkage.
extern const InplaceSteps kCpuInplaceSteps;
const InplaceSteps kCpuInplaceSteps{write_output_keeping_input, normalized_input};

TORCH_LIBRARY_IMPL(custom_bn, CPU, m) {
  m.impl("batch_norm_relu_forward_", TORCH_FN(forward_inplace_kernel<kCpuInplaceSteps>));
  m.impl("batch_norm_relu_inplace_backward", TORCH_FN(inplace_backward_kernel<kCpuInplaceSteps>));
}

}  // namespace custom_bn::cpu
