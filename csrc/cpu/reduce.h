// The reduction engine of the CPU kernels: per channel, the sums of kSums terms of each
// element, where terms(inputs, params) is generic over opmath vectors and scalars and returns
// std::array<same type, kSums + kEmits>: kSums terms to sum, then kEmits (0 or 1) values to
// write to `emit` at the element's offset, so that an elementwise result comes out of the
// same pass.
//
// Float vectors are added for at most kFlushEvery steps, then flushed into double totals
// (blocked summation: fast like float, accurate like double). Work is split by size alone,
// never by thread count, and item totals are added in item order: results are bitwise the
// same for any number of threads.
#pragma once

#include "cpu/parallel.h"
#include "cpu/plan.h"
#include "cpu/vec_io.h"

#include <algorithm>
#include <array>
#include <vector>

namespace custom_bn::cpu::CPU_CAPABILITY {

// Vector steps (rows, for channels-last) between flushes of float sums into double totals.
// (kFlushEveryRow, in plan.h, for channels-last rows.)
constexpr int64_t kFlushEvery = 64;

// Item results a parallel task of a merge combines at least: a small layer's merge (a few
// items per channel) then runs inline, as a parallel region costs more than it.
constexpr int64_t kMergeGrain = 16384;

// Channels per parallel task of a merge of items_per_channel results per channel.
inline int64_t merge_grain(int64_t items_per_channel) {
  return std::max<int64_t>(64, kMergeGrain / std::max<int64_t>(1, items_per_channel));
}

// Calls fn(c) for every channel, in parallel where the merge is large: the per-channel merges
// of item results.
template <typename Fn>
void for_each_channel(int64_t channels, int64_t items_per_channel, const Fn& fn) {
  at::parallel_for(0, channels, merge_grain(items_per_channel), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c);
  });
}

// Channels-first work items. An item is a group of whole (n, c) runs of one channel, or one
// segment of a long run: at most kItemElements values, so that a second pass over an item
// reads the cache.
struct ChannelsFirstItems {
  int64_t segments, segment_length, runs_per_item, per_channel;

  explicit ChannelsFirstItems(const ChannelView& view)
      : segments(ceil_div(view.inner, kItemElements)),
        segment_length(ceil_div(view.inner, segments)),
        runs_per_item(segments > 1 ? 1 : std::max<int64_t>(1, kItemElements / view.inner)),
        per_channel(ceil_div(view.outer, runs_per_item) * segments) {}

  struct Span {
    int64_t channel, n_begin, n_end, s0, length;
    int64_t count() const { return (n_end - n_begin) * length; }
  };
  Span span(const ChannelView& view, int64_t item) const {
    const int64_t group = (item % per_channel) / segments;
    const int64_t s0 = (item % segments) * segment_length;
    return {item / per_channel, group * runs_per_item,
            std::min(view.outer, (group + 1) * runs_per_item), s0,
            std::min(segment_length, view.inner - s0)};
  }
};

// The kSums sums of one channels-first item, with the channel's parameters p.
template <int kInputs, int kSums, int kParams, int kEmits, typename scalar_t, typename Terms>
std::array<double, kSums> reduce_channels_first_item(
    const std::array<const scalar_t*, kInputs> in, const std::array<opmath_t<scalar_t>, kParams> p,
    const CpuPlan& plan, const ChannelsFirstItems::Span& span, const Terms& terms, scalar_t* emit) {
  using opmath = opmath_t<scalar_t>;
  using Vec = Vectorized<opmath>;
  const ChannelView& view = plan.view;
  const std::array<Vec, kParams> pv = broadcast<kParams>(p);
  std::array<double, kSums> totals{};
  // Vector sums run on across the runs of the item (short runs: 49 values at 7x7). Two sets
  // of them, for the two vectors of a step: one chain of dependent adds would bound the pass
  // by the add latency rather than by memory.
  std::array<Vec, kSums> partial, partial_high;
  const auto flush = [&] {  // the vector sums into the double totals, then restarted
    for_each_constant<kSums>([&](auto k) {
      totals[k] += lane_sum(partial[k] + partial_high[k]);
      partial[k] = Vec(opmath(0));
      partial_high[k] = Vec(opmath(0));
    });
  };
  for_each_constant<kSums>([&](auto k) {
    partial[k] = Vec(opmath(0));
    partial_high[k] = Vec(opmath(0));
  });
  int64_t steps = 0;
  const int64_t run_stride = view.channels * view.inner;
  const int64_t prefetch_ahead = plan.prefetch_runs_ahead * run_stride;  // in values
  for (int64_t n = span.n_begin; n < span.n_end; ++n) {
    const int64_t base = (n * view.channels + span.channel) * view.inner + span.s0;
    const bool prefetching =
        plan.prefetch != Prefetch::kNone && n + plan.prefetch_runs_ahead < span.n_end;
    if (prefetching && plan.prefetch == Prefetch::kWholeRuns) {
      for (int j = 0; j < kInputs; ++j) {
        for (int64_t i = 0; i < span.length; i += kCacheLineBytes / int64_t(sizeof(scalar_t))) {
          __builtin_prefetch(in[j] + base + prefetch_ahead + i);
        }
      }
    }
    int64_t i = 0;
    // Two vectors a step, so that an emitted bfloat16/float16 result is one full store.
    for (; i + 2 * Vec::size() <= span.length; i += 2 * Vec::size()) {
      if (prefetching && plan.prefetch == Prefetch::kEachStep) {
        for (int j = 0; j < kInputs; ++j) {
          __builtin_prefetch(in[j] + base + prefetch_ahead + i);
          __builtin_prefetch(in[j] + base + prefetch_ahead + i + Vec::size());
        }
      }
      const auto low = terms(load_inputs<kInputs>(in, base + i), pv);
      const auto high = terms(load_inputs<kInputs>(in, base + i + Vec::size()), pv);
      for_each_constant<kSums>([&](auto k) {
        partial[k] += low[k];
        partial_high[k] += high[k];
      });
      if constexpr (kEmits == 1) store_pair(emit + base + i, low[kSums], high[kSums]);
      steps += 2;
      if (steps >= kFlushEvery) {
        flush();
        steps = 0;
      }
    }
    for (; i + Vec::size() <= span.length; i += Vec::size()) {
      const auto t = terms(load_inputs<kInputs>(in, base + i), pv);
      for_each_constant<kSums>([&](auto k) { partial[k] += t[k]; });
      if constexpr (kEmits == 1) store_vec(emit + base + i, t[kSums]);
      if (++steps >= kFlushEvery) {
        flush();
        steps = 0;
      }
    }
    for (; i < span.length; ++i) {
      const auto t = terms(scalar_inputs<kInputs>(in, base + i), p);
      for (int k = 0; k < kSums; ++k) totals[k] += t[k];
      if constexpr (kEmits == 1) emit[base + i] = static_cast<scalar_t>(t[kSums]);
    }
  }
  for_each_constant<kSums>([&](auto k) { totals[k] += lane_sum(partial[k] + partial_high[k]); });
  return totals;
}

// The sums of a channel's items, added in item order.
template <int kSums>
std::array<double, kSums> sum_in_item_order(const std::array<double, kSums>* item_totals,
                                            int64_t items) {
  std::array<double, kSums> sum{};
  for (int64_t j = 0; j < items; ++j) {
    for (int k = 0; k < kSums; ++k) sum[k] += item_totals[j][k];
  }
  return sum;
}

template <int kInputs, int kSums, int kParams, int kEmits, typename scalar_t, typename Terms>
void reduce_channels_first(const std::array<const scalar_t*, kInputs>& in,
                           const std::array<const opmath_t<scalar_t>*, kParams>& params,
                           const CpuPlan& plan, const Terms& terms,
                           const std::array<opmath_t<scalar_t>*, kSums>& out, scalar_t* emit) {
  const ChannelsFirstItems items(plan.view);
  const int64_t C = plan.view.channels;
  std::vector<std::array<double, kSums>> item_totals(C * items.per_channel);
  at::parallel_for(0, C * items.per_channel, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const ChannelsFirstItems::Span span = items.span(plan.view, item);
      item_totals[item] = reduce_channels_first_item<kInputs, kSums, kParams, kEmits>(
          in, scalar_params<kParams>(params, span.channel), plan, span, terms, emit);
    }
  });
  for_each_channel(C, items.per_channel, [&](int64_t c) {
    const std::array<double, kSums> sum =
        sum_in_item_order<kSums>(item_totals.data() + c * items.per_channel, items.per_channel);
    for (int k = 0; k < kSums; ++k) out[k][c] = static_cast<opmath_t<scalar_t>>(sum[k]);
  });
}

// kRowsAtOnce rows share each load and store of the partial sums.
constexpr int64_t kRowsAtOnce = 8;

// One work unit of a channels-last reduction (ChannelsLastWork, plan.h): rows [row_begin,
// row_end) of channels [channel_begin, channel_end).
struct ChannelsLastUnit {
  int64_t item, row_begin, row_end, channel_begin, channel_end;
};

inline ChannelsLastUnit channels_last_unit(const CpuPlan& plan, int64_t unit) {
  const ChannelsLastWork& work = plan.channels_last_work;
  const int64_t item = unit % work.items, slice = unit / work.items;
  return {item, item * work.rows_per_item,
          std::min(plan.view.outer, (item + 1) * work.rows_per_item), slice * work.slice_channels,
          std::min(plan.view.channels, (slice + 1) * work.slice_channels)};
}

// Adds the kSums sums of one channels-last unit to totals[kSums * C] (its channels): float
// sums per channel in `partial` (kSums * C, scratch), flushed every kFlushEveryRow rows. The
// unit starts on a vector pair of channels, so each channel takes the same code path (pair,
// single vector, scalar tail) as without slices.
template <int kInputs, int kSums, int kParams, int kEmits, typename scalar_t, typename Terms>
void reduce_channels_last_unit(const std::array<const scalar_t*, kInputs> in,
                               const std::array<const opmath_t<scalar_t>*, kParams> params,
                               const int64_t C, const ChannelsLastUnit unit, const Terms& terms,
                               opmath_t<scalar_t>* partial, double* totals, scalar_t* emit) {
  using opmath = opmath_t<scalar_t>;
  using Vec = Vectorized<opmath>;
  static_assert(kFlushEveryRow % kRowsAtOnce == 0);
  const int64_t c_begin = unit.channel_begin, c_end = unit.channel_end;
  const int64_t vec_end = c_end - (c_end - c_begin) % Vec::size();
  const auto clear_partial = [&] {
    for (int k = 0; k < kSums; ++k)
      std::fill(partial + k * C + c_begin, partial + k * C + c_end, 0);
  };
  clear_partial();
  int64_t rows_since_flush = 0;
  for (int64_t row = unit.row_begin; row < unit.row_end; row += kRowsAtOnce) {
    const int64_t rows = std::min(kRowsAtOnce, unit.row_end - row);
    int64_t c = c_begin;
    // Two vectors of channels a step: an emitted bfloat16/float16 result is one full store.
    for (; c + 2 * Vec::size() <= vec_end; c += 2 * Vec::size()) {
      const std::array<Vec, kParams> pv_low = load_params<kParams>(params, c);
      const std::array<Vec, kParams> pv_high = load_params<kParams>(params, c + Vec::size());
      std::array<Vec, kSums> low, high;
      for (int k = 0; k < kSums; ++k) low[k] = Vec::loadu(partial + k * C + c);
      for (int k = 0; k < kSums; ++k) high[k] = Vec::loadu(partial + k * C + c + Vec::size());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t offset = (row + r) * C + c;
        const auto t_low = terms(load_inputs<kInputs>(in, offset), pv_low);
        const auto t_high = terms(load_inputs<kInputs>(in, offset + Vec::size()), pv_high);
        for (int k = 0; k < kSums; ++k) low[k] += t_low[k];
        for (int k = 0; k < kSums; ++k) high[k] += t_high[k];
        if constexpr (kEmits == 1) store_pair(emit + offset, t_low[kSums], t_high[kSums]);
      }
      for (int k = 0; k < kSums; ++k) low[k].store(partial + k * C + c);
      for (int k = 0; k < kSums; ++k) high[k].store(partial + k * C + c + Vec::size());
    }
    for (; c < vec_end; c += Vec::size()) {
      const std::array<Vec, kParams> pv = load_params<kParams>(params, c);
      std::array<Vec, kSums> acc;
      for (int k = 0; k < kSums; ++k) acc[k] = Vec::loadu(partial + k * C + c);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t offset = (row + r) * C + c;
        const auto t = terms(load_inputs<kInputs>(in, offset), pv);
        for (int k = 0; k < kSums; ++k) acc[k] += t[k];
        if constexpr (kEmits == 1) store_vec(emit + offset, t[kSums]);
      }
      for (int k = 0; k < kSums; ++k) acc[k].store(partial + k * C + c);
    }
    for (c = vec_end; c < c_end; ++c) {
      const std::array<opmath, kParams> p = scalar_params<kParams>(params, c);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t offset = (row + r) * C + c;
        const auto t = terms(scalar_inputs<kInputs>(in, offset), p);
        for (int k = 0; k < kSums; ++k) partial[k * C + c] += t[k];
        if constexpr (kEmits == 1) emit[offset] = static_cast<scalar_t>(t[kSums]);
      }
    }
    rows_since_flush += rows;
    if (rows_since_flush == kFlushEveryRow || row + rows == unit.row_end) {
      for (int k = 0; k < kSums; ++k) {
        for (int64_t j = k * C + c_begin; j < k * C + c_end; ++j) totals[j] += partial[j];
      }
      clear_partial();
      rows_since_flush = 0;
    }
  }
}

template <int kInputs, int kSums, int kParams, int kEmits, typename scalar_t, typename Terms>
void reduce_channels_last(const std::array<const scalar_t*, kInputs>& in,
                          const std::array<const opmath_t<scalar_t>*, kParams>& params,
                          const CpuPlan& plan, const Terms& terms,
                          const std::array<opmath_t<scalar_t>*, kSums>& out, scalar_t* emit) {
  const int64_t C = plan.view.channels;
  const int64_t items = plan.channels_last_work.items;
  std::vector<double> item_totals(items * kSums * C, 0.0);
  // Scratch per thread, for as many units as the thread takes.
  at::parallel_for(0, items * plan.channels_last_work.slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t<scalar_t>> partial(kSums * C);
    for (int64_t u = begin; u < end; ++u) {
      const ChannelsLastUnit unit = channels_last_unit(plan, u);
      reduce_channels_last_unit<kInputs, kSums, kParams, kEmits>(
          in, params, C, unit, terms, partial.data(), item_totals.data() + unit.item * kSums * C,
          emit);
    }
  });
  // Item totals per channel in item order: channels in blocks, items outer, so that the inner
  // loop runs along contiguous channels.
  at::parallel_for(0, C, merge_grain(items), [&](int64_t begin, int64_t end) {
    std::vector<double> sum(kSums * (end - begin), 0.0);
    for (int64_t item = 0; item < items; ++item) {
      for (int k = 0; k < kSums; ++k) {
        const double* totals = item_totals.data() + (item * kSums + k) * C;
        double* acc = sum.data() + k * (end - begin);
        for (int64_t c = begin; c < end; ++c) acc[c - begin] += totals[c];
      }
    }
    for (int k = 0; k < kSums; ++k) {
      for (int64_t c = begin; c < end; ++c) {
        out[k][c] = static_cast<opmath_t<scalar_t>>(sum[k * (end - begin) + c - begin]);
      }
    }
  });
}

template <int kInputs, int kSums, int kParams, int kEmits, typename scalar_t, typename Terms>
void reduce_channels(const std::array<const scalar_t*, kInputs>& in,
                     const std::array<const opmath_t<scalar_t>*, kParams>& params,
                     const CpuPlan& plan, const Terms& terms,
                     const std::array<opmath_t<scalar_t>*, kSums>& out, scalar_t* emit = nullptr) {
  if (plan.view.layout == Layout::kChannelsLast) {
    reduce_channels_last<kInputs, kSums, kParams, kEmits>(in, params, plan, terms, out, emit);
  } else {
    reduce_channels_first<kInputs, kSums, kParams, kEmits>(in, params, plan, terms, out, emit);
  }
}

}  // namespace custom_bn::cpu::CPU_CAPABILITY
