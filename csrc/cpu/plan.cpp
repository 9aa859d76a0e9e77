// The rules of a CPU call's plan (plan.h). The cache sizes they use are cache_sizes.cpp's, the
// report of a plan (the debug op custom_bn::_cpu_plan) plan_report.cpp's.
#include "cpu/plan.h"

#include "cpu/cache_sizes.h"
#include "cpu/kernels.h"
#include "cpu/result_cache.h"

#include <c10/util/Exception.h>

namespace custom_bn::cpu {
namespace {

// Whether every contiguous run of the tensor (a channels-first (n, c) run, a channels-last
// row) is whole vectors, so that each run starts aligned where the tensor does.
bool runs_are_whole_vectors(const ChannelView& view, int64_t element_size, int64_t vector_bytes) {
  const int64_t run = view.layout == Layout::kChannelsLast ? view.channels : view.inner;
  return run * element_size % vector_bytes == 0;
}

// Runs that are not whole vectors (7x7 and 14x14 float32, 28x28 bfloat16) are walked flat: run
// by run, every other run's vectors straddle cache lines and each run ends in a masked vector.
// The flat walk needs runs of at least a pair of (opmath) vectors, so that a pair holds at most
// one boundary.
Walk choose_walk(const ChannelView& view, int64_t element_size, int64_t vector_bytes,
                 int64_t opmath_size) {
  if (view.layout == Layout::kChannelsLast) return Walk::kChannelsLastRows;
  const bool flat = !runs_are_whole_vectors(view, element_size, vector_bytes) &&
                    view.inner >= 2 * (vector_bytes / opmath_size);
  return flat ? Walk::kChannelsFirstFlat : Walk::kChannelsFirstRuns;
}

// Items of about 4 * kItemElements values, slices as ChannelsLastWork says. A slice is whole
// pairs of opmath vectors (the reduction's step), so each channel is summed by the same vector
// or scalar code with or without slices; and at least two cache lines of a row, the pair the
// adjacent-line prefetcher fetches, so that two threads do not pull each other's lines.
ChannelsLastWork plan_channels_last_work(const ChannelView& view, int64_t element_size,
                                         int64_t vector_bytes, int64_t opmath_size) {
  ChannelsLastWork work{};
  const int64_t C = std::max<int64_t>(1, view.channels);
  work.rows_per_item = std::max<int64_t>(kFlushEveryRow, 4 * kItemElements / C);
  work.items = ceil_div(view.outer, work.rows_per_item);
  const int64_t pair_lanes = 2 * vector_bytes / opmath_size;
  const int64_t wanted_slices = work.items > 0 ? ceil_div(kChannelsLastUnits, work.items) : 1;
  const int64_t narrowest =
      std::max(ceil_div(C, wanted_slices), ceil_div(2 * kCacheLineBytes, element_size));
  work.slice_channels = ceil_div(narrowest, pair_lanes) * pair_lanes;
  work.slices = ceil_div(view.channels, work.slice_channels);
  return work;
}

}  // namespace

CallWork work_of(std::string_view op, bool training, bool residual) {
  if (op == "batch_norm_forward") return {1, training};
  if (op == "batch_norm_relu_forward") return {residual ? 2 : 1, training && !residual};
  if (op == "batch_norm_backward") return {2, training};
  // With the residual's gradient wanted, the reduction writes dz and the elementwise pass
  // reads (dz, x); that extra write stream measured slower a channel at a time.
  if (op == "batch_norm_relu_backward") return {residual ? 2 : 3, training && !residual};
  if (op == "batch_norm_elemt") return {1, false};
  if (op == "batch_norm_backward_elemt") return {2, false};
  TORCH_CHECK_VALUE(op == "batch_norm_stats" || op == "batch_norm_backward_reduce",
                    "custom_bn::_cpu_plan: expected op to name a custom_bn op with a CPU kernel, "
                    "but got '",
                    op, "'");
  return {0, false};  // a reduction alone
}

CpuPlan plan_call(const ChannelView& view, at::ScalarType dtype, const CallWork& work) {
  const int64_t element_size = c10::elementSize(dtype);
  const int64_t opmath_size = dtype == at::kDouble ? 8 : 4;
  const int64_t vector_bytes = kernels().vector_bytes;
  const int64_t values = view.outer * view.channels * view.inner;
  CpuPlan plan{view, Walk::kChannelsFirstRuns, false, false, Prefetch::kNone, 1, false, {}};
  if (view.layout == Layout::kChannelsLast) {
    plan.channels_last_work =
        plan_channels_last_work(view, element_size, vector_bytes, opmath_size);
  }

  // A channel at a time: one channel of the pass's tensors fits in L2, and all of them exceed
  // the last-level cache, so that the two-kernel path's second read would come from memory.
  // Where they fill most of that cache, the two-kernel path's second read hits it anyway, and
  // its elementwise pass, walking memory in order, is faster than a channel's runs. On small
  // layers (an eighth of it at most) one pass a channel wins again: the two-kernel path's
  // extra parallel regions and item merges cost more there than the data (docs/perf.md).
  const int64_t values_per_channel = view.outer * view.inner;
  const int64_t channel_bytes = work.elementwise_inputs * values_per_channel * element_size;
  const int64_t pass_bytes = channel_bytes * view.channels;
  const bool small_layer =
      pass_bytes <= cache_bytes(3) / 8 && values_per_channel >= kMinChannelValuesForChannelAtATime;
  plan.channel_at_a_time = work.may_go_channel_at_a_time && view.layout == Layout::kChannelsFirst &&
                           channel_bytes > 0 && channel_bytes <= cache_bytes(2) &&
                           (pass_bytes > cache_bytes(3) || small_layer);
  // A channel's runs are not adjacent, so a channel at a time walks run by run.
  plan.walk = plan.channel_at_a_time ? Walk::kChannelsFirstRuns
                                     : choose_walk(view, element_size, vector_bytes, opmath_size);

  // Streamed when the pass's inputs and its result exceed the last-level cache together (the
  // result will not stay cached for the next op, and a streamed line skips the read for
  // ownership), unless a line would mix streamed and regular stores, which measured slower
  // than not streaming at all: the run-by-run walk of runs that are not whole vectors.
  const bool exceeds_cache = (work.elementwise_inputs + 1) * values * element_size > cache_bytes(3);
  plan.stream_result = exceeds_cache && (plan.walk == Walk::kChannelsFirstFlat ||
                                         runs_are_whole_vectors(view, element_size, vector_bytes));

  // Channels-first reductions: the hardware prefetcher starts over on each run, and one
  // thread then draws a fraction of the memory bandwidth.
  if (view.layout == Layout::kChannelsFirst && view.inner > 0) {
    const int64_t segments = ceil_div(view.inner, kItemElements);
    const int64_t run_bytes = ceil_div(view.inner, segments) * element_size;
    if (run_bytes >= 1024) {
      plan.prefetch = Prefetch::kEachStep;
    } else if (run_bytes >= 256) {
      plan.prefetch = Prefetch::kWholeRuns;
      plan.prefetch_runs_ahead = ceil_div(1024, run_bytes);
    }
  }

  plan.in_result_cache = result_cache().serves(values * element_size);
  return plan;
}

}  // namespace custom_bn::cpu
