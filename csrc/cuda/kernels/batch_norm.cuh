// The device kernels of custom_bn, written once against csrc/cuda/simt.h: compiled by nvcc
// for the GPU, and by the host compiler for test/simt, which runs them on the CPU.
//
// Per-channel reductions (statistics, backward sums) share one shape: a grid of
// (slices, channel groups) blocks; each thread accumulates its elements, a block merges
// them (warp shuffles, then shared memory), each block writes one partial per channel, and
// the last block of a channel group to arrive (an atomic counter, no waiting) merges the
// partials in slice order and finishes: the same result for any block order.
#pragma once

#include "batch_norm_math.h"
#include "channel_view.h"
#include "cuda/simt.h"

#include <cstdint>

namespace custom_bn::kernels {

// A dense tensor is seen as the host sees it (csrc/channel_view.h): channels-first (N, C, S)
// or channels-last (N*S, C).
CUSTOM_BN_DEVICE bool is_channels_last(const ChannelView& v) {
  return v.layout == Layout::kChannelsLast;
}

// The i-th of the values of channel c (i < outer * inner).
template <typename index_t>
CUSTOM_BN_DEVICE index_t channel_offset(const ChannelView& v, index_t c, index_t i) {
  if (is_channels_last(v)) return i * static_cast<index_t>(v.channels) + c;
  const index_t inner = static_cast<index_t>(v.inner);
  return ((i / inner) * static_cast<index_t>(v.channels) + c) * inner + i % inner;
}

// The channel of the element at dense offset i.
template <typename index_t>
CUSTOM_BN_DEVICE index_t channel_of(const ChannelView& v, index_t i) {
  const index_t channels = static_cast<index_t>(v.channels);
  return is_channels_last(v) ? i % channels : (i / static_cast<index_t>(v.inner)) % channels;
}

// The running-stats update of a training step, on the device: momentum, or (momentum < 0)
// 1 / num_batches_tracked read on the device, so momentum = None needs no host sync.
template <typename param_t>
struct RunningUpdate {
  param_t* mean = nullptr;  // null: no update
  param_t* var = nullptr;
  const int64_t* num_batches_tracked = nullptr;
  double momentum = 0.1;

  template <typename acc_t, typename index_t>
  CUSTOM_BN_DEVICE void apply(index_t c, const WelfordStats<acc_t>& batch) const {
    if (mean == nullptr || !(batch.count > acc_t(0))) return;  // an empty batch updates nothing
    const acc_t factor = momentum >= 0
                             ? static_cast<acc_t>(momentum)
                             : acc_t(1) / static_cast<acc_t>(simt::load(num_batches_tracked));
    simt::store(mean + c, static_cast<param_t>(running_update(
                              static_cast<acc_t>(simt::load(mean + c)), batch.mean, factor)));
    simt::store(var + c,
                static_cast<param_t>(running_update(static_cast<acc_t>(simt::load(var + c)),
                                                    unbiased_var(batch.m2, batch.count), factor)));
  }
};

// ---- accumulators: what a reduction keeps, how it merges and finishes -----------------------

// Welford statistics of x; finishing writes mean, M2, invstd and the running stats.
template <typename scalar_t, typename acc_t, typename param_t>
struct StatsAccumulator {
  using value_t = WelfordStats<acc_t>;
  static constexpr int kFields = 3;
  const scalar_t* x;
  acc_t* mean;
  acc_t* m2;
  acc_t* invstd;  // may be null
  double eps;
  RunningUpdate<param_t> running;

  CUSTOM_BN_DEVICE value_t identity() const { return {acc_t(0), acc_t(0), acc_t(0)}; }
  template <typename index_t>
  CUSTOM_BN_DEVICE void add(value_t& s, index_t offset, index_t) const {
    const acc_t value = static_cast<acc_t>(simt::load(x + offset));
    s.count += acc_t(1);
    const acc_t delta = value - s.mean;
    s.mean += delta / s.count;
    s.m2 += delta * (value - s.mean);
  }
  CUSTOM_BN_DEVICE value_t merge(const value_t& a, const value_t& b) const {
    return welford_merge(a, b);
  }
  CUSTOM_BN_DEVICE void store(acc_t* out, const value_t& s) const {
    simt::store(out, s.count);
    simt::store(out + 1, s.mean);
    simt::store(out + 2, s.m2);
  }
  CUSTOM_BN_DEVICE value_t load(const acc_t* in) const {
    return {simt::load(in), simt::load(in + 1), simt::load(in + 2)};
  }
  CUSTOM_BN_DEVICE value_t shuffle_down(const value_t& s, int delta) const {
    return {simt::shuffle_down(s.count, delta), simt::shuffle_down(s.mean, delta),
            simt::shuffle_down(s.m2, delta)};
  }
  template <typename index_t>
  CUSTOM_BN_DEVICE void finish(index_t c, const value_t& s) const {
    simt::store(mean + c, s.mean);
    simt::store(m2 + c, s.m2);
    if (invstd != nullptr) {
      simt::store(invstd + c, s.count > acc_t(0) ? invstd_from_var(s.m2 / s.count, eps) : acc_t(0));
    }
    running.apply(c, s);
  }
};

template <typename acc_t>
struct GradSums {
  acc_t sum_dy;
  acc_t sum_dy_xmu;
};

// The backward sums: sum(dy) and sum(dy * (x - mean)). Given the output of a fused
// batch_norm_relu, dy is first multiplied by the activation's gradient (act), and that dz is
// written to grad_masked (when not null): the activation's backward fused into the reduction.
// Given alpha and beta instead (a smooth act), the gradient is taken at the pre-activation
// (x - mean) * alpha + beta, recomputed as normalize_elements computed it.
template <typename scalar_t, typename acc_t>
struct GradAccumulator {
  using value_t = GradSums<acc_t>;
  static constexpr int kFields = 2;
  const scalar_t* grad_output;
  const scalar_t* x;
  const acc_t* mean;
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;
  const scalar_t* output = nullptr;
  scalar_t* grad_masked = nullptr;
  ActivationFunction<acc_t> act{};
  const acc_t* alpha = nullptr;
  const acc_t* beta = nullptr;

  CUSTOM_BN_DEVICE value_t identity() const { return {acc_t(0), acc_t(0)}; }
  template <typename index_t>
  CUSTOM_BN_DEVICE void add(value_t& s, index_t offset, index_t c) const {
    acc_t dy = static_cast<acc_t>(simt::load(grad_output + offset));
    const acc_t xv = static_cast<acc_t>(simt::load(x + offset));
    const acc_t m = simt::load(mean + c);
    if (alpha != nullptr) {
      dy = activation_grad_at(dy, normalize(xv, m, simt::load(alpha + c), simt::load(beta + c)),
                              act.kind);
    } else if (output != nullptr) {
      dy = activation_grad(dy, static_cast<acc_t>(simt::load(output + offset)), act);
    }
    // Rounded to scalar_t as torch's activation backward rounds its result, and summed so:
    // the input-gradient pass reads it back, and its sums must be of the same values.
    if (grad_masked != nullptr) {
      const scalar_t rounded = static_cast<scalar_t>(dy);
      simt::store(grad_masked + offset, rounded);
      dy = static_cast<acc_t>(rounded);
    }
    s.sum_dy += dy;
    s.sum_dy_xmu += dy * (xv - m);
  }
  CUSTOM_BN_DEVICE value_t merge(const value_t& a, const value_t& b) const {
    return {a.sum_dy + b.sum_dy, a.sum_dy_xmu + b.sum_dy_xmu};
  }
  CUSTOM_BN_DEVICE void store(acc_t* out, const value_t& s) const {
    simt::store(out, s.sum_dy);
    simt::store(out + 1, s.sum_dy_xmu);
  }
  CUSTOM_BN_DEVICE value_t load(const acc_t* in) const {
    return {simt::load(in), simt::load(in + 1)};
  }
  CUSTOM_BN_DEVICE value_t shuffle_down(const value_t& s, int delta) const {
    return {simt::shuffle_down(s.sum_dy, delta), simt::shuffle_down(s.sum_dy_xmu, delta)};
  }
  template <typename index_t>
  CUSTOM_BN_DEVICE void finish(index_t c, const value_t& s) const {
    simt::store(sum_dy + c, s.sum_dy);
    simt::store(sum_dy_xmu + c, s.sum_dy_xmu);
  }
};

// ---- the reduction --------------------------------------------------------------------------

// Shared memory a block of `threads` needs for reduce_channels with accumulator Acc.
template <typename Acc, typename acc_t>
constexpr int reduce_shared_bytes(int threads) {
  return static_cast<int>(sizeof(acc_t)) * Acc::kFields * (threads / simt::kWarpSize) +
         static_cast<int>(sizeof(int));
}

// Grid: x = slices of the reduction, y = channel groups. Channels-first: a group is one
// channel, reduced by the whole block. Channels-last: a group is block_size() consecutive
// channels, one per thread (coalesced rows). partials: [C][slices][fields]; arrivals: one
// zeroed counter per group, left zeroed for the next launch.
template <typename Acc, typename acc_t, typename index_t>
CUSTOM_BN_DEVICE void reduce_channels(const Acc& acc, const ChannelView& v, acc_t* partials,
                                      int* arrivals) {
  using value_t = typename Acc::value_t;
  const index_t per_channel = static_cast<index_t>(v.outer) * static_cast<index_t>(v.inner);
  const index_t slices = simt::grid_x();
  const index_t slice = simt::block_x();
  const int t = simt::thread_index();
  int shared_offset = 0;
  acc_t* warp_values = simt::shared_array<acc_t>(
      Acc::kFields * (simt::block_size() / simt::kWarpSize), shared_offset);
  int* is_last = simt::shared_array<int>(1, shared_offset);

  if (!is_channels_last(v)) {
    const index_t c = simt::block_y();
    value_t s = acc.identity();
    const index_t stride = slices * simt::block_size();
    for (index_t i = slice * simt::block_size() + t; i < per_channel; i += stride) {
      acc.add(s, channel_offset(v, c, i), c);
    }
    for (int delta = simt::kWarpSize / 2; delta > 0; delta /= 2) {
      s = acc.merge(s, acc.shuffle_down(s, delta));
    }
    if (t % simt::kWarpSize == 0) acc.store(warp_values + Acc::kFields * (t / simt::kWarpSize), s);
    simt::sync_block();
    if (t == 0) {
      value_t block = acc.load(warp_values);
      for (int w = 1; w < simt::block_size() / simt::kWarpSize; ++w) {
        block = acc.merge(block, acc.load(warp_values + Acc::kFields * w));
      }
      acc.store(partials + (c * slices + slice) * Acc::kFields, block);
      simt::thread_fence();  // the partial is visible before the arrival is counted
      if (simt::atomic_add(arrivals + c, 1) == static_cast<int>(slices) - 1) {
        simt::thread_fence();
        value_t total = acc.load(partials + c * slices * Acc::kFields);
        for (index_t j = 1; j < slices; ++j) {
          total = acc.merge(total, acc.load(partials + (c * slices + j) * Acc::kFields));
        }
        acc.finish(c, total);
        simt::store(arrivals + c, 0);
      }
    }
    return;
  }

  // Channels-last: thread t owns channel c over this slice's rows.
  const index_t c = static_cast<index_t>(simt::block_y()) * simt::block_size() + t;
  const bool has_channel = c < static_cast<index_t>(v.channels);
  const index_t rows_per_slice = (per_channel + slices - 1) / slices;
  const index_t row_end =
      per_channel < (slice + 1) * rows_per_slice ? per_channel : (slice + 1) * rows_per_slice;
  if (has_channel) {
    value_t s = acc.identity();
    for (index_t row = slice * rows_per_slice; row < row_end; ++row) {
      acc.add(s, channel_offset(v, c, row), c);
    }
    acc.store(partials + (c * slices + slice) * Acc::kFields, s);
  }
  simt::thread_fence();
  simt::sync_block();
  if (t == 0) {
    *is_last = simt::atomic_add(arrivals + simt::block_y(), 1) == static_cast<int>(slices) - 1;
  }
  simt::sync_block();
  if (*is_last) {
    simt::thread_fence();
    if (has_channel) {
      value_t total = acc.load(partials + c * slices * Acc::kFields);
      for (index_t j = 1; j < slices; ++j) {
        total = acc.merge(total, acc.load(partials + (c * slices + j) * Acc::kFields));
      }
      acc.finish(c, total);
    }
    if (t == 0) simt::store(arrivals + simt::block_y(), 0);
  }
}

// ---- elementwise ----------------------------------------------------------------------------

// Calls body(i) for every i in [0, count), spread over the whole grid (a grid-stride loop).
template <typename index_t, typename Body>
CUSTOM_BN_DEVICE void for_grid_stride(index_t count, const Body& body) {
  const index_t stride = static_cast<index_t>(simt::grid_x()) * simt::block_size();
  for (index_t i =
           static_cast<index_t>(simt::block_x()) * simt::block_size() + simt::thread_index();
       i < count; i += stride) {
    body(i);
  }
}

template <typename index_t>
CUSTOM_BN_DEVICE index_t element_count(const ChannelView& v) {
  return static_cast<index_t>(v.outer) * static_cast<index_t>(v.channels) *
         static_cast<index_t>(v.inner);
}

// y = (x - mean) * invstd * weight + bias over every element (grid-stride loop); with
// apply_activation, y = act(that + residual), residual optional (null).
template <typename scalar_t, typename acc_t, typename param_t, typename index_t>
CUSTOM_BN_DEVICE void normalize_elements(const scalar_t* x, scalar_t* y, const ChannelView& v,
                                         const acc_t* mean, const acc_t* invstd,
                                         const param_t* weight, const param_t* bias,
                                         bool apply_activation = false,
                                         ActivationFunction<acc_t> act = {},
                                         const scalar_t* residual = nullptr) {
  for_grid_stride(element_count<index_t>(v), [&](index_t i) {
    const index_t c = channel_of(v, i);
    const acc_t w = weight != nullptr ? static_cast<acc_t>(simt::load(weight + c)) : acc_t(1);
    const acc_t b = bias != nullptr ? static_cast<acc_t>(simt::load(bias + c)) : acc_t(0);
    acc_t value = normalize(static_cast<acc_t>(simt::load(x + i)), simt::load(mean + c),
                            simt::load(invstd + c) * w, b);
    if (residual != nullptr) value += static_cast<acc_t>(simt::load(residual + i));
    simt::store(y + i, static_cast<scalar_t>(apply_activation ? activate(value, act) : value));
  });
}

// grad_input from the per-channel sums (training) or from invstd alone (eval).
template <typename scalar_t, typename acc_t, typename param_t, typename index_t>
CUSTOM_BN_DEVICE void grad_input_elements(const scalar_t* grad_output, const scalar_t* x,
                                          scalar_t* grad_input, const ChannelView& v,
                                          const acc_t* mean, const acc_t* invstd,
                                          const param_t* weight, const acc_t* sum_dy,
                                          const acc_t* sum_dy_xmu, acc_t count, bool training) {
  for_grid_stride(element_count<index_t>(v), [&](index_t i) {
    const index_t c = channel_of(v, i);
    const acc_t w = weight != nullptr ? static_cast<acc_t>(simt::load(weight + c)) : acc_t(1);
    const acc_t channel_invstd = simt::load(invstd + c);
    const GradInputCoefficients<acc_t> k =
        training ? grad_input_coefficients_training(channel_invstd, w, simt::load(sum_dy + c),
                                                    simt::load(sum_dy_xmu + c), count)
                 : grad_input_coefficients_eval(channel_invstd, w);
    simt::store(grad_input + i, static_cast<scalar_t>(::custom_bn::grad_input(
                                    static_cast<acc_t>(simt::load(grad_output + i)),
                                    static_cast<acc_t>(simt::load(x + i)), simt::load(mean + c),
                                    k.dy_mean, k.a, k.b)));
  });
}

// invstd = 1 / sqrt(var + eps) per channel, for eval: one thread a channel.
template <typename acc_t>
CUSTOM_BN_DEVICE void eval_invstd(const acc_t* var, acc_t* invstd, int64_t channels, double eps) {
  for_grid_stride(channels, [&](int64_t c) {
    simt::store(invstd + c, invstd_from_var(simt::load(var + c), eps));
  });
}

// Merges per-rank (count, mean, M2) by parallel Welford, rank by rank: one thread a channel.
template <typename acc_t, typename param_t>
CUSTOM_BN_DEVICE void merge_rank_stats(const acc_t* means, const acc_t* m2s, const acc_t* counts,
                                       int64_t ranks, int64_t channels, acc_t* mean_out,
                                       acc_t* invstd_out, double eps,
                                       const RunningUpdate<param_t>& running) {
  for_grid_stride(channels, [&](int64_t c) {
    WelfordStats<acc_t> total{acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t r = 0; r < ranks; ++r) {
      total = welford_merge(
          total, WelfordStats<acc_t>{simt::load(counts + r), simt::load(means + r * channels + c),
                                     simt::load(m2s + r * channels + c)});
    }
    simt::store(mean_out + c, total.mean);
    simt::store(invstd_out + c,
                total.count > acc_t(0) ? invstd_from_var(total.m2 / total.count, eps) : acc_t(0));
    running.apply(c, total);
  });
}

}  // namespace custom_bn::kernels
