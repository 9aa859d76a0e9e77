// Channels-first training passes, one channel at a time (CpuPlan::channel_at_a_time): the
// reduction over a channel and the elementwise pass that needs its result run back to back,
// so that the second read of the channel comes from cache, not memory. The item sums, their
// merge and the per-channel math are those of the two-kernel path, so the results are bitwise
// the same.
#pragma once

#include "batch_norm_math.h"
#include "cpu/map.h"
#include "cpu/parallel.h"
#include "cpu/pass_math.h"
#include "cpu/plan.h"
#include "cpu/reduce.h"
#include "cpu/stats.h"

#include <array>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace custom_bn::cpu::CPU_CAPABILITY {

// Calls fn(c, scratch) for every channel, in parallel, about kItemElements values per task;
// scratch holds a channel's item results.
template <typename Result, typename Fn>
void for_each_channel_slab(const CpuPlan& plan, int64_t items_per_channel, const Fn& fn) {
  const int64_t values = plan.view.outer * plan.view.inner;
  const int64_t grain = std::max<int64_t>(1, kItemElements / std::max<int64_t>(1, values));
  at::parallel_for(0, plan.view.channels, grain, [&](int64_t begin, int64_t end) {
    std::vector<Result> scratch(items_per_channel);
    for (int64_t c = begin; c < end; ++c) fn(c, scratch.data());
    if (plan.stream_result) finish_streaming();
  });
}

// Maps every (n, c) run of channel c with the channel's parameters p.
template <int kInputs, int kParams, typename scalar_t, typename Fn>
void map_channel(const std::array<const scalar_t*, kInputs>& in,
                 const std::array<opmath_t<scalar_t>, kParams>& p, const CpuPlan& plan, int64_t c,
                 const Fn& fn, scalar_t* out) {
  const ChannelView& view = plan.view;
  const auto pv = broadcast<kParams>(p);
  for (int64_t n = 0; n < view.outer; ++n) {
    map_run<kInputs, kParams>(in, pv, (n * view.channels + c) * view.inner, view.inner, fn, out,
                              plan.stream_result);
  }
}

// The statistics of each channel, then invstd = 1 / sqrt(m2 / n + eps) and
// alpha = invstd * weight, then the normalized channel (with an activation: act of it) into out.
template <typename scalar_t>
void normalize_channel_at_a_time(const scalar_t* x, const CpuPlan& plan,
                                 const opmath_t<scalar_t>* w, const opmath_t<scalar_t>* b,
                                 double eps,
                                 const std::optional<ActivationFunction<opmath_t<scalar_t>>>& act,
                                 opmath_t<scalar_t>* mean_out, opmath_t<scalar_t>* m2_out,
                                 opmath_t<scalar_t>* invstd_out, scalar_t* out) {
  using opmath = opmath_t<scalar_t>;
  const ChannelView& view = plan.view;
  const ChannelsFirstItems items(view);
  const opmath count = static_cast<opmath>(view.outer * view.inner);
  for_each_channel_slab<WelfordStats<double>>(
      plan, items.per_channel, [&](int64_t c, WelfordStats<double>* parts) {
        const opmath shift = static_cast<opmath>(x[c * view.inner]);
        for (int64_t j = 0; j < items.per_channel; ++j) {
          parts[j] = channels_first_item_stats(x, plan, items.span(view, c * items.per_channel + j),
                                               shift);
        }
        const WelfordStats<double> stats = merge_items(parts, items.per_channel);
        mean_out[c] = static_cast<opmath>(stats.mean);
        m2_out[c] = static_cast<opmath>(stats.m2);
        invstd_out[c] = custom_bn::invstd_from_var(m2_out[c] / count, eps);
        const std::array<opmath, 3> p{mean_out[c], invstd_out[c] * w[c], b[c]};
        const std::array<const scalar_t*, 1> in{x};
        if (act) {
          map_channel<1, 3>(in, p, plan, c, normalize_activate(*act), out);
        } else {
          map_channel<1, 3>(in, p, plan, c, kNormalize, out);
        }
      });
}

// The sums of channel c's items in item order, then the training coefficients and the input
// gradient: reduce_terms gives (dz, dz * (x - mean)), grad_input_of(v, q) the gradient, both
// from the same inputs. With alpha and beta (a smooth activation, whose gradient is taken at
// the pre-activation (x - mean) * alpha + beta; kSmooth), reduce_terms takes (mean, alpha,
// beta) and grad_input_of (mean, dy_mean, a, b, alpha, beta).
template <int kInputs, bool kSmooth, typename scalar_t, typename ReduceTerms, typename GradFn>
void grad_input_channel_at_a_time(const std::array<const scalar_t*, kInputs>& in,
                                  const CpuPlan& plan, const opmath_t<scalar_t>* mean_in,
                                  const opmath_t<scalar_t>* invstd_in, const opmath_t<scalar_t>* w,
                                  opmath_t<scalar_t>* sum_dy_out,
                                  opmath_t<scalar_t>* sum_dy_xmu_out,
                                  const ReduceTerms& reduce_terms, const GradFn& grad_input_of,
                                  scalar_t* out, const opmath_t<scalar_t>* alpha = nullptr,
                                  const opmath_t<scalar_t>* beta = nullptr) {
  using opmath = opmath_t<scalar_t>;
  const ChannelView& view = plan.view;
  const ChannelsFirstItems items(view);
  const opmath count = static_cast<opmath>(view.outer * view.inner);
  for_each_channel_slab<std::array<double, 2>>(
      plan, items.per_channel, [&](int64_t c, std::array<double, 2>* parts) {
        const auto sum_item = [&](const auto& p, int64_t j) {
          constexpr int kParams = std::tuple_size_v<std::decay_t<decltype(p)>>;
          return reduce_channels_first_item<kInputs, 2, kParams, 0>(
              in, p, plan, items.span(view, c * items.per_channel + j), reduce_terms,
              (scalar_t*)nullptr);
        };
        for (int64_t j = 0; j < items.per_channel; ++j) {
          if constexpr (kSmooth) {
            parts[j] = sum_item(std::array<opmath, 3>{mean_in[c], alpha[c], beta[c]}, j);
          } else {
            parts[j] = sum_item(std::array<opmath, 1>{mean_in[c]}, j);
          }
        }
        const std::array<double, 2> sum = sum_in_item_order<2>(parts, items.per_channel);
        sum_dy_out[c] = static_cast<opmath>(sum[0]);
        sum_dy_xmu_out[c] = static_cast<opmath>(sum[1]);
        const GradInputCoefficients<opmath> k = grad_input_coefficients_training(
            invstd_in[c], w[c], sum_dy_out[c], sum_dy_xmu_out[c], count);
        if constexpr (kSmooth) {
          map_channel<kInputs, 6>(
              in, std::array<opmath, 6>{mean_in[c], k.dy_mean, k.a, k.b, alpha[c], beta[c]}, plan,
              c, grad_input_of, out);
        } else {
          map_channel<kInputs, 4>(in, std::array<opmath, 4>{mean_in[c], k.dy_mean, k.a, k.b}, plan,
                                  c, grad_input_of, out);
        }
      });
}

}  // namespace custom_bn::cpu::CPU_CAPABILITY
