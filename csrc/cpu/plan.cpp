// The plan of a CPU call (plan.h): its rules, the cache sizes they use, and the debug op
// custom_bn::_cpu_plan that reports a plan.
#include "cpu/plan.h"

#include "cpu/kernels.h"
#include "cpu/result_memory.h"
#include "layout.h"
#include "settings.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace custom_bn::cpu {
namespace {

// The size of this CPU's cache at `level`, as Linux describes it in sysfs ("32768K"); 0 when
// it does not. glibc's sysconf is no substitute: on AMD it reports the L3 of the whole
// package, not the part the cores of this machine share (docs/perf.md).
int64_t sysfs_cache_bytes(int level) {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    std::ifstream level_file(dir + "/level"), type_file(dir + "/type"), size_file(dir + "/size");
    int found_level = 0;
    std::string type, size;
    if (!(level_file >> found_level) || !(type_file >> type) || !(size_file >> size)) break;
    if (found_level != level || type == "Instruction") continue;
    char* unit = nullptr;
    const long long value = std::strtoll(size.c_str(), &unit, 10);
    const int64_t scale = *unit == 'K' ? 1 << 10 : *unit == 'M' ? 1 << 20 : 1;
    return value > 0 ? value * scale : 0;
  }
  return 0;
}

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

// Names of the enumerators, in declaration order, for describe_plan.
constexpr const char* kWalkNames[] = {"channels_last_rows", "channels_first_runs",
                                      "channels_first_flat"};
constexpr const char* kPrefetchNames[] = {"none", "whole_runs", "each_step"};
constexpr const char* kResultMemoryNames[] = {"torch_allocator", "result_cache"};

template <size_t N, typename Enum>
const char* name_of(const char* const (&names)[N], Enum value) {
  return names[static_cast<size_t>(value)];
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

// CUSTOM_BN_CACHE_BYTES_L2 / _L3, if set: the cache sizes to plan with, so that tests can
// reach the paths of layers larger than the cache with small tensors.
int64_t cache_bytes_setting(const char* name) {
  return count_setting(name, "a number of bytes", 1, 0);
}

int64_t cache_bytes(int level) {
  static const auto measure = [](int level, const char* setting, int sysconf_name,
                                 int64_t fallback) {
    int64_t bytes = cache_bytes_setting(setting);
    if (bytes <= 0) bytes = sysfs_cache_bytes(level);
    if (bytes <= 0) bytes = sysconf(sysconf_name);
    return bytes > 0 ? bytes : fallback;
  };
  static const int64_t l2 =
      measure(2, "CUSTOM_BN_CACHE_BYTES_L2", _SC_LEVEL2_CACHE_SIZE, int64_t(1) << 20);
  static const int64_t l3 =
      measure(3, "CUSTOM_BN_CACHE_BYTES_L3", _SC_LEVEL3_CACHE_SIZE, int64_t(32) << 20);
  return level == 2 ? l2 : l3;
}

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
  CpuPlan plan{view, Walk::kChannelsFirstRuns,      false, false, Prefetch::kNone,
               1,    ResultMemory::kTorchAllocator, {}};
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
      pass_bytes <= cache_bytes(3) / 8 && values_per_channel >= kMinChannelValuesByChannel;
  plan.channel_at_a_time = work.may_go_by_channel && view.layout == Layout::kChannelsFirst &&
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

  plan.result_memory = result_allocator().serves(values * element_size)
                           ? ResultMemory::kResultCache
                           : ResultMemory::kTorchAllocator;
  return plan;
}

std::string describe_plan(const CpuPlan& plan) {
  std::ostringstream out;
  out << std::boolalpha << "{\"capability\": \"" << kernel_capability() << "\", \"walk\": \""
      << name_of(kWalkNames, plan.walk) << "\", \"channel_at_a_time\": " << plan.channel_at_a_time
      << ", \"stream_result\": " << plan.stream_result << ", \"prefetch\": \""
      << name_of(kPrefetchNames, plan.prefetch)
      << "\", \"prefetch_runs_ahead\": " << plan.prefetch_runs_ahead << ", \"result_memory\": \""
      << name_of(kResultMemoryNames, plan.result_memory)
      << "\", \"channels_last_items\": " << plan.channels_last_work.items
      << ", \"channels_last_slices\": " << plan.channels_last_work.slices
      << ", \"channels_last_slice_channels\": " << plan.channels_last_work.slice_channels
      << ", \"l2_bytes\": " << cache_bytes(2) << ", \"l3_bytes\": " << cache_bytes(3) << "}";
  return out.str();
}

namespace {

// custom_bn::_cpu_plan: the plan of a CPU call, as JSON, for tests and the benchmark.
std::string cpu_plan_op(const at::Tensor& input, c10::string_view op, bool training,
                        bool residual) {
  TORCH_CHECK(input.dim() >= 2, "custom_bn::_cpu_plan: expected input with at least 2 ",
              "dimensions (N, C, *), but got input of shape ", input.sizes());
  const DenseTensor dense = make_dense(input);
  return describe_plan(
      plan_call(dense.view, input.scalar_type(),
                work_of(std::string_view(op.data(), op.size()), training, residual)));
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, CPU, m) { m.impl("_cpu_plan", TORCH_FN(cpu_plan_op)); }

}  // namespace custom_bn::cpu
