// The CPU steps of in-place activated batch norm (csrc/inplace.h): each walks memory in chunks,
// in parallel, once to count the kept positions of each chunk and once to write, over an input
// that is dense and shares its strides with the output and the residual (the layouts models
// train in: contiguous, channels_last). Any other layout takes the generic steps, which keep
// the same values in the same order.
#include "inplace.h"
#include "channel_stats.h"
#include "op_params.h"
#include "optional_tensor.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace custom_bn::cpu {
namespace {

constexpr int64_t kChunk = int64_t{1} << 14;

bool walks_memory(const at::Tensor& input, const at::Tensor& other,
                  const std::optional<at::Tensor>& residual) {
  return input.is_non_overlapping_and_dense() && other.strides() == input.strides() &&
         (!has(residual) || residual->strides() == input.strides());
}

// A per-channel tensor as a vector of acc_t (empty when absent).
template <typename acc_t>
std::vector<acc_t> channel_values(const std::optional<at::Tensor>& t) {
  if (!has(t)) return {};
  const at::Tensor values = t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return {values.data_ptr<acc_t>(), values.data_ptr<acc_t>() + values.numel()};
}

// kept_positions (csrc/inplace.cpp) for one element, in the same operations; what depends on the
// channel alone is worked out once per channel.
template <typename acc_t>
struct KeepRule {
  struct Channel {
    bool always;  // kept whatever the value (no residual): weight 0, or an unsafe bias
    acc_t abs_bias, scale;
  };
  acc_t lower, upper;
  bool clips_lower, has_upper, has_bias, has_residual;
  std::vector<Channel> channels;

  KeepRule(const Activation& act, const std::optional<at::Tensor>& w,
           const std::optional<at::Tensor>& b, bool residual, int64_t count)
      : lower(static_cast<acc_t>(act.lower)),
        upper(static_cast<acc_t>(act.upper)),
        clips_lower(act.slope == 0.0),
        has_upper(!std::isnan(act.upper)),
        has_bias(has(b)),
        has_residual(residual) {
    const std::vector<acc_t> weight = channel_values<acc_t>(w), bias = channel_values<acc_t>(b);
    const acc_t margin = static_cast<acc_t>(kRecoveryMargin);
    for (int64_t c = 0; c < count; ++c) {
      const acc_t abs_bias = has_bias ? std::abs(bias[c]) : acc_t(0);
      const acc_t scale = weight.empty() ? margin : std::abs(weight[c]) * margin;
      const bool always = has_bias ? !(scale > abs_bias) : !weight.empty() && weight[c] == acc_t(0);
      channels.push_back({always, abs_bias, scale});
    }
  }

  // Branch-free: whether a value is kept is as random as the data.
  bool kept(const Channel& ch, acc_t y, acc_t r) const {
    const bool clipped = (clips_lower & (y <= lower)) | (has_upper & (y >= upper));
    if (!has_residual) return clipped | ch.always;
    const acc_t offset = has_bias ? ch.abs_bias + std::abs(r) : std::abs(r);
    return clipped | !(ch.scale > offset);
  }
};

// condition ? a : b without a branch (the compiler would branch, mispredicting half the time).
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

// Calls f(i0, i1, c) for the runs of one channel c that make up memory offsets [begin, end) of a
// dense (N, C, *) tensor.
template <typename F>
void walk(int64_t begin, int64_t end, int64_t channels, int64_t channel_stride, const F& f) {
  int64_t c = (begin / channel_stride) % channels;
  int64_t left = channel_stride - begin % channel_stride;
  for (int64_t i = begin; i < end;) {
    const int64_t run_end = std::min(end, i + left);
    f(i, run_end, c);
    i = run_end;
    left = channel_stride;
    if (++c == channels) c = 0;
  }
}

int64_t channel_stride(const at::Tensor& t) { return t.size(1) > 1 ? t.stride(1) : 1; }

// The kept positions before each chunk (and the total, last).
template <typename scalar_t, typename acc_t>
std::vector<int64_t> kept_offsets(const KeepRule<acc_t>& rule, const scalar_t* y, const scalar_t* r,
                                  int64_t numel, int64_t channels, int64_t stride) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  std::vector<int64_t> offsets(chunks + 1, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      int64_t count = 0;
      walk(chunk * kChunk, std::min(numel, (chunk + 1) * kChunk), channels, stride,
           [&](int64_t i0, int64_t i1, int64_t c) {
             const auto ch = rule.channels[c];
             for (int64_t i = i0; i < i1; ++i) {
               count += rule.kept(ch, static_cast<acc_t>(y[i]), r ? static_cast<acc_t>(r[i]) : 0);
             }
           });
      offsets[chunk + 1] = count;
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk) offsets[chunk + 1] += offsets[chunk];
  return offsets;
}

at::Tensor write_output_keeping_input(at::Tensor& input, const at::Tensor& output,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual,
                                      const Activation& act) {
  if (!walks_memory(input, output, residual)) {
    return kGenericInplaceSteps.write_output_keeping_input(input, output, weight, bias, residual,
                                                           act);
  }
  at::Tensor kept_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_relu_forward_", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const KeepRule<acc_t> rule(act, weight, bias, has(residual), input.size(1));
        scalar_t* x = input.data_ptr<scalar_t>();
        const scalar_t* y = output.const_data_ptr<scalar_t>();
        const scalar_t* r = has(residual) ? residual->const_data_ptr<scalar_t>() : nullptr;
        const int64_t numel = input.numel(), channels = input.size(1);
        const int64_t stride = channel_stride(input);
        const std::vector<int64_t> offsets = kept_offsets(rule, y, r, numel, channels, stride);
        // One spare value: the loop stores every value and advances past the kept ones.
        kept_input = at::empty({offsets.back() + 1}, input.options());
        scalar_t* kept = kept_input.data_ptr<scalar_t>();
        kept_input = kept_input.narrow(0, 0, offsets.back());
        const int64_t chunks = static_cast<int64_t>(offsets.size()) - 1;
        at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
          for (int64_t chunk = first; chunk < last; ++chunk) {
            int64_t next = offsets[chunk];
            walk(chunk * kChunk, std::min(numel, (chunk + 1) * kChunk), channels, stride,
                 [&](int64_t i0, int64_t i1, int64_t c) {
                   const auto ch = rule.channels[c];
                   for (int64_t i = i0; i < i1; ++i) {
                     const scalar_t yv = y[i];
                     kept[next] = x[i];
                     next += rule.kept(ch, static_cast<acc_t>(yv),
                                       r ? static_cast<acc_t>(r[i]) : acc_t(0));
                     x[i] = yv;
                   }
                 });
          }
        });
      });
  return kept_input;
}

at::Tensor normalized_input(const at::Tensor& output, const at::Tensor& kept_input,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, const at::Tensor& mean,
                            const at::Tensor& invstd, const Activation& act) {
  if (!walks_memory(output, output, residual)) {
    return kGenericInplaceSteps.normalized_input(output, kept_input, weight, bias, residual, mean,
                                                 invstd, act);
  }
  const at::Tensor x_hat =
      at::empty_like(output, output.options().dtype(stat_dtype(output.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, output.scalar_type(), "batch_norm_relu_inplace_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const KeepRule<acc_t> rule(act, weight, bias, has(residual), output.size(1));
        const std::vector<acc_t> w = channel_values<acc_t>(weight);
        const std::vector<acc_t> b = channel_values<acc_t>(bias);
        const std::vector<acc_t> m = channel_values<acc_t>(mean);
        const std::vector<acc_t> s = channel_values<acc_t>(invstd);
        const acc_t lower = static_cast<acc_t>(act.lower), slope = static_cast<acc_t>(act.slope);
        const bool inverts_slope = act.slope != 0.0 && act.slope != 1.0;
        const scalar_t* y = output.const_data_ptr<scalar_t>();
        const scalar_t* r = has(residual) ? residual->const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* kept = kept_input.const_data_ptr<scalar_t>();
        acc_t* out = x_hat.data_ptr<acc_t>();
        const int64_t numel = output.numel(), channels = output.size(1);
        const int64_t stride = channel_stride(output);
        const std::vector<int64_t> offsets = kept_offsets(rule, y, r, numel, channels, stride);
        check_kept_count("custom_bn::batch_norm_relu_inplace_backward", offsets.back(), kept_input);
        const int64_t kept_count = kept_input.numel(), last_kept = kept_count - 1;
        const int64_t chunks = static_cast<int64_t>(offsets.size()) - 1;
        at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
          for (int64_t chunk = first; chunk < last; ++chunk) {
            int64_t next = offsets[chunk];
            walk(chunk * kChunk, std::min(numel, (chunk + 1) * kChunk), channels, stride,
                 [&](int64_t i0, int64_t i1, int64_t c) {
                   const auto ch = rule.channels[c];
                   const acc_t bc = b.empty() ? acc_t(0) : b[c], wc = w.empty() ? acc_t(1) : w[c];
                   const acc_t mc = m[c], sc = s[c];
                   for (int64_t i = i0; i < i1; ++i) {
                     const acc_t yv = static_cast<acc_t>(y[i]);
                     const acc_t rv = r ? static_cast<acc_t>(r[i]) : acc_t(0);
                     const bool is_kept = rule.kept(ch, yv, rv);
                     // Read at a valid index whether kept or not.
                     const acc_t xv = kept_count > 0
                                          ? static_cast<acc_t>(kept[std::min(next, last_kept)])
                                          : acc_t(0);
                     next += is_kept;
                     acc_t z =
                         inverts_slope ? select(yv <= lower, (yv - lower) / slope + lower, yv) : yv;
                     if (!b.empty()) z = z - bc;
                     if (r) z = z - rv;
                     const acc_t recovered = w.empty() ? z : z / wc;
                     out[i] = select(is_kept, (xv - mc) * sc, recovered);
                   }
                 });
          }
        });
      });
  return x_hat;
}

const InplaceSteps kCpuInplaceSteps{write_output_keeping_input, normalized_input};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_inplace(
    CUSTOM_BN_BATCH_NORM_RELU_FORWARD_INPLACE_PARAMS) {
  return run_forward_inplace(kCpuInplaceSteps, input, weight, bias, running_mean, running_var,
                             num_batches_tracked, residual, training, momentum, eps,
                             CUSTOM_BN_INPLACE_ACTIVATION_ARGS, keep_input);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> inplace_backward(
    CUSTOM_BN_BATCH_NORM_RELU_INPLACE_BACKWARD_PARAMS) {
  return run_inplace_backward(kCpuInplaceSteps, grad_output, output, kept_input, weight, bias,
                              residual, running_mean, running_var, save_mean, save_invstd, training,
                              eps, output_mask, CUSTOM_BN_INPLACE_ACTIVATION_ARGS);
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, CPU, m) {
  m.impl("batch_norm_relu_forward_", TORCH_FN(forward_inplace));
  m.impl("batch_norm_relu_inplace_backward", TORCH_FN(inplace_backward));
}

}  // namespace custom_bn::cpu
