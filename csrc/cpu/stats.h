// The statistics algorithm of the CPU kernels: per channel, (mean, M2) of the input.
//
// Per work item, two passes while the item is in cache: the mean of x - shift (shift: the
// channel's first value, so no cancellation when the mean is large against the spread, and
// exact zeros for constant channels), then the squared deviations from the item's mean; never
// a sum of squares. Items merge in double, in item order. Memory is read once; accuracy is
// that of two passes.
#pragma once

#include "batch_norm_math.h"
#include "cpu/parallel.h"
#include "cpu/plan.h"
#include "cpu/reduce.h"

#include <array>
#include <memory>
#include <vector>

namespace custom_bn::cpu::CPU_CAPABILITY {

template <typename scalar_t>
struct StatsPasses {
  using opmath = opmath_t<scalar_t>;
  static constexpr auto shifted = [](const auto& v, const auto& p) {
    return std::array{v[0] - p[0]};
  };
  static constexpr auto squared_deviation = [](const auto& v, const auto& p) {
    const auto deviation = v[0] - p[0];
    return std::array{deviation * deviation};
  };
  // (mean, M2) of count values from their shifted sum and their squared deviations from
  // the rounded mean used in the second pass (corrected to the exact mean).
  static WelfordStats<double> item(double count, double shift, double shifted_sum,
                                   opmath rounded_mean, double squared_sum) {
    const double mean = shift + shifted_sum / count;
    const double offset = mean - static_cast<double>(rounded_mean);
    return {count, mean, std::max(0.0, squared_sum - count * offset * offset)};
  }
};

// The (mean, M2) of one channels-first item, by its two passes; shift is the channel's.
template <typename scalar_t>
WelfordStats<double> channels_first_item_stats(const scalar_t* x, const CpuPlan& plan,
                                               const ChannelsFirstItems::Span& span,
                                               opmath_t<scalar_t> shift) {
  using Passes = StatsPasses<scalar_t>;
  using opmath = opmath_t<scalar_t>;
  const std::array<const scalar_t*, 1> in{x};
  const double count = static_cast<double>(span.count());
  const double shifted_sum = reduce_channels_first_item<1, 1, 1, 0>(
      in, std::array<opmath, 1>{shift}, plan, span, Passes::shifted, (scalar_t*)nullptr)[0];
  const opmath rounded_mean = static_cast<opmath>(shift + shifted_sum / count);
  const double squared_sum =
      reduce_channels_first_item<1, 1, 1, 0>(in, std::array<opmath, 1>{rounded_mean}, plan, span,
                                             Passes::squared_deviation, (scalar_t*)nullptr)[0];
  return Passes::item(count, shift, shifted_sum, rounded_mean, squared_sum);
}

// A channel's (mean, M2) from its items', in item order: the mean from the items' sums, then
// each item's M2 about it (no division per item, as a chain of welford_merge calls would take).
inline WelfordStats<double> merge_items(const WelfordStats<double>* parts, int64_t count) {
  double values = 0, sum = 0, total_m2 = 0;
  for (int64_t j = 0; j < count; ++j) {
    values += parts[j].count;
    sum += parts[j].count * parts[j].mean;
  }
  const double total_mean = sum / values;
  for (int64_t j = 0; j < count; ++j) {
    total_m2 += m2_about(parts[j].m2, parts[j].count, parts[j].mean, total_mean);
  }
  return {values, total_mean, total_m2};
}

template <typename scalar_t>
void collect_stats_channels_first(const scalar_t* x, const CpuPlan& plan,
                                  const std::vector<opmath_t<scalar_t>>& shift,
                                  opmath_t<scalar_t>* mean, opmath_t<scalar_t>* m2) {
  using opmath = opmath_t<scalar_t>;
  const ChannelView& view = plan.view;
  const ChannelsFirstItems items(view);
  std::vector<WelfordStats<double>> item_stats(view.channels * items.per_channel);
  at::parallel_for(0, view.channels * items.per_channel, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const ChannelsFirstItems::Span span = items.span(view, item);
      item_stats[item] = channels_first_item_stats(x, plan, span, shift[span.channel]);
    }
  });
  for_each_channel(view.channels, items.per_channel, [&](int64_t c) {
    const WelfordStats<double> stats =
        merge_items(item_stats.data() + c * items.per_channel, items.per_channel);
    mean[c] = static_cast<opmath>(stats.mean);
    m2[c] = static_cast<opmath>(stats.m2);
  });
}

template <typename scalar_t>
void collect_stats_channels_last(const scalar_t* x, const CpuPlan& plan,
                                 const std::vector<opmath_t<scalar_t>>& shift,
                                 opmath_t<scalar_t>* mean, opmath_t<scalar_t>* m2) {
  using Passes = StatsPasses<scalar_t>;
  using opmath = opmath_t<scalar_t>;
  const ChannelsLastWork& work = plan.channels_last_work;
  const int64_t M = plan.view.outer, C = plan.view.channels;
  const int64_t rows_per_item = work.rows_per_item, items = work.items;
  const std::array<const scalar_t*, 1> in{x};
  // Per item and channel: mean and M2, as rows [item][C] so that the combination below runs
  // along channels in vectors. Every element is written below: no zero-filling.
  const std::unique_ptr<double[]> item_mean(new double[items * C]);
  const std::unique_ptr<double[]> item_m2(new double[items * C]);
  at::parallel_for(0, items * work.slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath> partial(C), rounded_mean(C);
    std::vector<double> shifted_sum(C), squared_sum(C);
    for (int64_t u = begin; u < end; ++u) {
      const ChannelsLastUnit unit = channels_last_unit(plan, u);
      const int64_t c_begin = unit.channel_begin, c_end = unit.channel_end;
      const double count = static_cast<double>(unit.row_end - unit.row_begin);
      std::fill(shifted_sum.begin() + c_begin, shifted_sum.begin() + c_end, 0.0);
      reduce_channels_last_unit<1, 1, 1, 0>(in, std::array<const opmath*, 1>{shift.data()}, C, unit,
                                            Passes::shifted, partial.data(), shifted_sum.data(),
                                            (scalar_t*)nullptr);
      for (int64_t c = c_begin; c < c_end; ++c) {
        rounded_mean[c] = static_cast<opmath>(shift[c] + shifted_sum[c] / count);
      }
      std::fill(squared_sum.begin() + c_begin, squared_sum.begin() + c_end, 0.0);
      reduce_channels_last_unit<1, 1, 1, 0>(in, std::array<const opmath*, 1>{rounded_mean.data()},
                                            C, unit, Passes::squared_deviation, partial.data(),
                                            squared_sum.data(), (scalar_t*)nullptr);
      for (int64_t c = c_begin; c < c_end; ++c) {
        const WelfordStats<double> stats =
            Passes::item(count, shift[c], shifted_sum[c], rounded_mean[c], squared_sum[c]);
        item_mean[unit.item * C + c] = stats.mean;
        item_m2[unit.item * C + c] = stats.m2;
      }
    }
  });
  // Each channel's mean from its items' sums, then each item's M2 about it (no division per
  // item), in item order; channels in blocks, items outer so the inner loop is a vector one.
  at::parallel_for(0, C, merge_grain(items), [&](int64_t begin, int64_t end) {
    std::vector<double> sum(end - begin, 0.0), total_m2(end - begin, 0.0);
    for (int64_t item = 0; item < items; ++item) {
      const double count =
          static_cast<double>(std::min(M, (item + 1) * rows_per_item) - item * rows_per_item);
      const double* means = item_mean.get() + item * C;
      for (int64_t c = begin; c < end; ++c) sum[c - begin] += count * means[c];
    }
    for (int64_t c = begin; c < end; ++c) sum[c - begin] /= static_cast<double>(M);
    for (int64_t item = 0; item < items; ++item) {
      const double count =
          static_cast<double>(std::min(M, (item + 1) * rows_per_item) - item * rows_per_item);
      const double* means = item_mean.get() + item * C;
      const double* m2s = item_m2.get() + item * C;
      for (int64_t c = begin; c < end; ++c) {
        total_m2[c - begin] += m2_about(m2s[c], count, means[c], sum[c - begin]);
      }
    }
    for (int64_t c = begin; c < end; ++c) {
      mean[c] = static_cast<opmath>(sum[c - begin]);
      m2[c] = static_cast<opmath>(total_m2[c - begin]);
    }
  });
}

// The channel's first value: the shift of its statistics passes.
template <typename scalar_t>
std::vector<opmath_t<scalar_t>> channel_shifts(const scalar_t* x, const ChannelView& view) {
  std::vector<opmath_t<scalar_t>> shift(view.channels);
  const bool last = view.layout == Layout::kChannelsLast;
  for (int64_t c = 0; c < view.channels; ++c) {
    shift[c] = static_cast<opmath_t<scalar_t>>(x[last ? c : c * view.inner]);
  }
  return shift;
}

template <typename scalar_t>
void collect_stats(const scalar_t* x, const CpuPlan& plan, opmath_t<scalar_t>* mean,
                   opmath_t<scalar_t>* m2) {
  const std::vector<opmath_t<scalar_t>> shift = channel_shifts(x, plan.view);
  if (plan.view.layout == Layout::kChannelsLast) {
    collect_stats_channels_last(x, plan, shift, mean, m2);
  } else {
    collect_stats_channels_first(x, plan, shift, mean, m2);
  }
}

}  // namespace custom_bn::cpu::CPU_CAPABILITY
