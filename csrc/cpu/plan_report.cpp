// The report of a CPU call's plan: describe_plan (plan.h) and the debug op custom_bn::_cpu_plan
// that tests and the benchmark read it through.
#include "cpu/cache_sizes.h"
#include "cpu/kernels.h"
#include "cpu/plan.h"
#include "layout.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <sstream>

namespace custom_bn::cpu {
namespace {

// Names of the enumerators, in declaration order, for describe_plan.
constexpr const char* kWalkNames[] = {"channels_last_rows", "channels_first_runs",
                                      "channels_first_flat"};
constexpr const char* kPrefetchNames[] = {"none", "whole_runs", "each_step"};

template <size_t N, typename Enum>
const char* name_of(const char* const (&names)[N], Enum value) {
  return names[static_cast<size_t>(value)];
}

}  // namespace

std::string describe_plan(const CpuPlan& plan) {
  std::ostringstream out;
  out << std::boolalpha << "{\"capability\": \"" << kernel_capability() << "\", \"walk\": \""
      << name_of(kWalkNames, plan.walk) << "\", \"channel_at_a_time\": " << plan.channel_at_a_time
      << ", \"stream_result\": " << plan.stream_result << ", \"prefetch\": \""
      << name_of(kPrefetchNames, plan.prefetch)
      << "\", \"prefetch_runs_ahead\": " << plan.prefetch_runs_ahead
      << ", \"in_result_cache\": " << plan.in_result_cache
      << ", \"channels_last_items\": " << plan.channels_last_work.items
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
