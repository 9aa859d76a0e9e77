// Every decision the CPU kernels make about a call, computed in one place (plan_call) from
// the input's view, its dtype, the kernel variant's vector width and the cache sizes. The
// kernels follow the plan and decide nothing themselves; tests and the benchmark read it
// through the debug op custom_bn::_cpu_plan (describe_plan). Why each rule pays, with the
// measurements: docs/perf.md.
#pragma once

#include "channel_view.h"
#include "cpu/cache_sizes.h"

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <string_view>

namespace custom_bn::cpu {

// Values per parallel work item of a channels-first pass: small enough that an item's
// second read comes from L1/L2, large enough to amortize the scheduling. Channels-last items
// are 4x larger because each keeps a partial sum per channel.
constexpr int64_t kItemElements = 32768;

constexpr int64_t kCacheLineBytes = 64;

// The fewest values per channel with which a small layer goes a channel at a time: below that
// (a 8x512x4x4 layer has 128) the per-channel set-up costs more than the pass it saves.
constexpr int64_t kMinChannelValuesForChannelAtATime = 256;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows between flushes of a channels-last reduction's float sums into double totals.
constexpr int64_t kFlushEveryRow = 16;

// Work units a channels-last reduction is cut into at least, where its rows allow (the slices
// of ChannelsLastWork): one per thread of a 2-core machine. Sixteen cut most model layers' rows
// between threads and ran slower (docs/perf.md).
constexpr int64_t kChannelsLastUnits = 2;

// How an elementwise pass walks the tensor.
enum class Walk {
  kChannelsLastRows,   // rows of C values, lanes are channels
  kChannelsFirstRuns,  // run by run: each (n, c) run of S values with its channel's parameters
  kChannelsFirstFlat,  // as one flat array of vector pairs; a pair straddling two runs takes
                       // each lane's parameters from its own channel
};

// Software prefetch of a channels-first reduction, whose (n, c) runs lie C * S values apart.
enum class Prefetch {
  kNone,       // runs shorter than 256 bytes (they fit in cache)
  kWholeRuns,  // runs of 256 bytes to 1 KB: a whole run about 1 KB of work ahead
  kEachStep,   // runs of 1 KB or more: the next run along with each vector step
};

// What a call does, as far as planning goes.
struct CallWork {
  // Tensors its elementwise pass reads: x; (x, residual); (dy, x); (dy, output, x).
  int elementwise_inputs;
  // Training whose reduction feeds the elementwise pass directly (no residual in either
  // direction), so that the two may run a channel at a time.
  bool may_go_channel_at_a_time;
};

// The CallWork of an op ("batch_norm_forward", "batch_norm_backward",
// "batch_norm_relu_forward", "batch_norm_relu_backward", "batch_norm_elemt",
// "batch_norm_backward_elemt"): one table for the ops and the debug op.
CallWork work_of(std::string_view op, bool training, bool residual);

// How a channels-last reduction is cut into parallel work units: items of rows, the unit of
// its summation order, and where a tensor has fewer than kChannelsLastUnits items, slices of
// channels too (a 8x256x7x7 layer is one item of rows: without slices, one thread would sum it
// all). A channel's sums depend only on the items of rows, so slicing leaves every result
// bitwise the same. Units are numbered slice by slice, so that threads split by slices, and
// finish together even where the last item is short.
struct ChannelsLastWork {
  int64_t rows_per_item;
  int64_t items;           // items of rows
  int64_t slice_channels;  // whole vector pairs, and at least two cache lines of a row
  int64_t slices;
};

struct CpuPlan {
  ChannelView view;
  Walk walk;
  // Training a channel at a time: the reduction over a channel, then the elementwise pass over
  // it while it is still in L2. Chosen when one channel of the pass's tensors fits in L2 and
  // all of them exceed the last-level cache, or take at most an eighth of it with at least
  // kMinChannelValuesForChannelAtATime values per channel (channels-first only).
  bool channel_at_a_time;
  // The elementwise result is written with non-temporal stores: the pass's tensors exceed the
  // last-level cache, and no cache line would mix streamed and regular stores.
  bool stream_result;
  Prefetch prefetch;
  int64_t prefetch_runs_ahead;  // kWholeRuns: how many runs ahead
  // An elementwise result from result_cache() (freed large results are reused,
  // result_cache.h), else from c10::GetCPUAllocator() as torch's own results.
  bool in_result_cache;
  ChannelsLastWork channels_last_work;  // channels-last reductions only
};

CpuPlan plan_call(const ChannelView& view, at::ScalarType dtype, const CallWork& work);

// The plan as JSON, with the kernel variant and the cache sizes it was made with
// (plan_report.cpp).
std::string describe_plan(const CpuPlan& plan);

}  // namespace custom_bn::cpu
