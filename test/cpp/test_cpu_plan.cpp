// The plan of a CPU call (csrc/cpu/plan.h): what it decides for the layouts and sizes models
// produce, and that the paths it selects for layers larger than the last-level cache
// (streamed results, a channel at a time) give torch's results.
#include "cpu/kernels.h"
#include "cpu/plan.h"
#include "layout.h"
#include "samples.h"

#include <custom_bn/custom_bn.h>

#include <cstdlib>
#include <string>

namespace custom_bn::testing {
namespace {

cpu::CpuPlan plan_of(const torch::Tensor& x, const char* op, bool training, bool residual = false) {
  return cpu::plan_call(make_dense(x).view, x.scalar_type(), cpu::work_of(op, training, residual));
}

// ctest runs this suite on a narrower kernel variant than the widest (CMakeLists.txt): the
// one asked for is the one running, where the CPU has it.
TEST(CpuPlan, RunsTheKernelVariantAskedFor) {
  const char* requested = std::getenv("CUSTOM_BN_CPU_CAPABILITY");
  if (requested == nullptr || std::string(requested) == "avx512") {
    GTEST_SKIP() << "no narrower variant asked for";
  }
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  const std::string expected = std::string(requested) == "avx2" && has_avx2 ? "avx2" : "default";
  EXPECT_EQ(cpu::kernel_capability(), expected);
}

TEST(CpuPlan, WalksChannelsLastTensorsByRows) {
  const torch::Tensor x = torch::randn({2, 8, 5, 5}).contiguous(torch::MemoryFormat::ChannelsLast);
  const cpu::CpuPlan plan = plan_of(x, "batch_norm_forward", true);
  EXPECT_EQ(plan.walk, cpu::Walk::kChannelsLastRows);
  EXPECT_EQ(plan.prefetch, cpu::Prefetch::kNone);
  EXPECT_FALSE(plan.channel_at_a_time);
}

TEST(CpuPlan, WalksRunsThatAreNotWholeVectorsFlat) {
  // 7x7 float32 runs are 196 bytes: no instruction set's vectors divide them.
  EXPECT_EQ(plan_of(torch::randn({2, 8, 7, 7}), "batch_norm_forward", true).walk,
            cpu::Walk::kChannelsFirstFlat);
  // 16x16 float32 runs are 1 KB: whole vectors everywhere.
  const cpu::CpuPlan whole = plan_of(torch::randn({2, 8, 16, 16}), "batch_norm_forward", true);
  EXPECT_EQ(whole.walk, cpu::Walk::kChannelsFirstRuns);
  EXPECT_EQ(whole.prefetch, cpu::Prefetch::kEachStep);
  // Runs shorter than a pair of vectors are walked run by run.
  EXPECT_EQ(plan_of(torch::randn({2, 8, 3}), "batch_norm_forward", true).walk,
            cpu::Walk::kChannelsFirstRuns);
}

TEST(CpuPlan, PrefetchesRunsOfAQuarterToOneKilobyteWhole) {
  const cpu::CpuPlan plan = plan_of(torch::randn({2, 8, 100}), "batch_norm_forward", true);
  EXPECT_EQ(plan.prefetch, cpu::Prefetch::kWholeRuns);  // 400 bytes
  EXPECT_EQ(plan.prefetch_runs_ahead, 3);               // about 1 KB of work ahead
}

TEST(CpuPlan, SmallLayersStayInCacheAndInTorchsAllocator) {
  const cpu::CpuPlan plan = plan_of(torch::randn({8, 64, 28, 28}), "batch_norm_backward", true);
  EXPECT_FALSE(plan.stream_result);
  EXPECT_FALSE(plan.in_result_cache);
}

// Channels-first training goes a channel at a time on small layers too (an eighth of the
// last-level cache at most), but not on layers that fill more of it, nor on channels of
// fewer than kMinChannelValuesForChannelAtATime values.
TEST(CpuPlan, SmallChannelsFirstLayersTrainAChannelAtATime) {
  for (const char* op : {"batch_norm_forward", "batch_norm_backward"}) {
    EXPECT_TRUE(plan_of(torch::randn({8, 64, 28, 28}), op, true).channel_at_a_time) << op;
    EXPECT_TRUE(plan_of(torch::randn({8, 256, 7, 7}), op, true).channel_at_a_time) << op;
    EXPECT_FALSE(plan_of(torch::randn({8, 256, 7, 7}), op, false).channel_at_a_time) << op;
    EXPECT_FALSE(plan_of(torch::randn({8, 512, 4, 4}), op, true).channel_at_a_time) << op;
    EXPECT_FALSE(
        plan_of(torch::randn({8, 64, 28, 28}).contiguous(torch::MemoryFormat::ChannelsLast), op,
                true)
            .channel_at_a_time)
        << op;
  }
  // Twice an eighth of the cache: the two-kernel path.
  const int64_t channels = cpu::cache_bytes(3) / 4 / (8 * 49 * 4);
  EXPECT_FALSE(
      plan_of(torch::randn({8, channels, 7, 7}), "batch_norm_forward", true).channel_at_a_time);
}

TEST(CpuPlan, ResidualsKeepTheFusedOpOffTheChannelAtATimePath) {
  EXPECT_FALSE(
      cpu::work_of("batch_norm_relu_forward", true, /*residual=*/true).may_go_channel_at_a_time);
  EXPECT_FALSE(
      cpu::work_of("batch_norm_relu_backward", true, /*residual=*/true).may_go_channel_at_a_time);
  EXPECT_FALSE(
      cpu::work_of("batch_norm_backward", /*training=*/false, false).may_go_channel_at_a_time);
  EXPECT_EQ(cpu::work_of("batch_norm_relu_backward", true, false).elementwise_inputs, 3);
}

TEST(CpuPlan, UnknownOpsAreAValueError) {
  EXPECT_THROW(cpu::work_of("batch_norm_sideways", true, false), c10::ValueError);
}

class LargeLayers : public SeededTest {};

// Results larger than the last-level cache are written with non-temporal stores
// (CpuPlan::stream_result): run by run where every run is whole vectors (16x16 float32 runs,
// channels-last rows), else as one flat array whose pairs of vectors may straddle two runs
// (14x14 and 7x7 float32 runs; Walk::kChannelsFirstFlat). Eval mode, so that every sample's
// expected values follow from it alone: the first, a middle and the last sample are checked in
// float64.
TEST_F(LargeLayers, ResultsLargerThanTheCacheAreRight) {
  const int64_t target_bytes = cpu::cache_bytes(3) * 5 / 4;
  struct Case {
    torch::Dtype dtype;
    torch::MemoryFormat format;
    int64_t channels, spatial;
  };
  for (const Case& c : {Case{torch::kFloat, torch::MemoryFormat::Contiguous, 32, 16},
                        Case{torch::kFloat, torch::MemoryFormat::Contiguous, 32, 14},
                        Case{torch::kFloat, torch::MemoryFormat::Contiguous, 24, 7},
                        Case{torch::kBFloat16, torch::MemoryFormat::ChannelsLast, 64, 8}}) {
    const int64_t per_sample = c.channels * c.spatial * c.spatial * c10::elementSize(c.dtype);
    const int64_t n = (target_bytes + per_sample - 1) / per_sample;
    // Uniform draws: LibTorch's normal sampler takes seconds at this size.
    const torch::Tensor x = (torch::rand({n, c.channels, c.spatial, c.spatial}) * 4 - 2)
                                .to(c.dtype)
                                .contiguous(c.format)
                                .requires_grad_();
    const torch::Tensor w = torch::rand({c.channels});
    const torch::Tensor b = torch::randn({c.channels});
    const torch::Tensor rm = torch::randn({c.channels});
    const torch::Tensor rv = torch::rand({c.channels}) + 0.5;
    const torch::Tensor grad = torch::rand_like(x) - 0.5;
    const torch::Tensor out = custom_bn::batch_norm(x, w, b, rm, rv, false, 0.1, 1e-5);
    const torch::Tensor dx = torch::autograd::grad({out}, {x}, {grad})[0];
    const torch::Tensor fused =
        custom_bn::batch_norm_relu(x.detach(), w, b, rm, rv, false, 0.1, 1e-5);
    ASSERT_GT(out.nbytes(), static_cast<size_t>(target_bytes) * 4 / 5);
    ASSERT_TRUE(plan_of(x, "batch_norm_forward", false).stream_result);

    const auto per_channel = [](const torch::Tensor& t) {
      return t.to(torch::kDouble).view({1, -1, 1, 1});
    };
    const torch::Tensor scale = per_channel(w) / (per_channel(rv) + 1e-5).sqrt();
    for (int64_t i : {int64_t(0), n / 2, n - 1}) {
      const torch::Tensor xi = x[i].detach().unsqueeze(0).to(torch::kDouble);
      const torch::Tensor expected = (xi - per_channel(rm)) * scale + per_channel(b);
      const torch::Tensor expected_dx = grad[i].unsqueeze(0).to(torch::kDouble) * scale;
      const std::string what = std::string(c10::toString(c.dtype)) + " sample " +
                               std::to_string(i) + " of " + std::to_string(n);
      expect_close(out[i].unsqueeze(0), expected.to(c.dtype), tolerance(c.dtype), what + " output");
      expect_close(dx[i].unsqueeze(0), expected_dx.to(c.dtype), tolerance(c.dtype),
                   what + " grad_input");
      expect_close(fused[i].unsqueeze(0), torch::relu(expected).to(c.dtype), tolerance(c.dtype),
                   what + " batch_norm_relu output");
    }
  }
}

// Channels-first training on an input larger than the last-level cache whose channels fit in
// L2 goes a channel at a time (CpuPlan::channel_at_a_time): batch_norm and
// batch_norm_relu, forward and backward, against torch in float64 (and its ReLU's mask).
TEST_F(LargeLayers, TrainingAChannelAtATimeMatchesTorch) {
  const int64_t batch = 8, spatial = 16;
  const int64_t channels = cpu::cache_bytes(3) * 5 / 4 / (batch * spatial * spatial * 4) + 1;
  const torch::Tensor x0 = torch::rand({batch, channels, spatial, spatial}) * 4 - 1;
  for (const char* op : {"batch_norm_forward", "batch_norm_backward", "batch_norm_relu_forward",
                         "batch_norm_relu_backward"}) {
    ASSERT_TRUE(plan_of(x0, op, true).channel_at_a_time) << op;
  }
  const torch::Tensor w = torch::rand({channels}) + 0.5;
  const torch::Tensor b = torch::randn({channels});
  const torch::Tensor grad = torch::rand_like(x0) - 0.5;
  for (bool relu : {false, true}) {
    const torch::Tensor x = x0.clone().requires_grad_();
    const torch::Tensor out = relu ? custom_bn::batch_norm_relu(x, w, b, {}, {}, true, 0.1, 1e-5)
                                   : custom_bn::batch_norm(x, w, b, {}, {}, true, 0.1, 1e-5);
    const torch::Tensor dx = torch::autograd::grad({out}, {x}, {grad})[0];

    const torch::Tensor x64 = x0.to(torch::kDouble).requires_grad_();
    torch::Tensor expected = torch::batch_norm(x64, w.to(torch::kDouble), b.to(torch::kDouble), {},
                                               {}, true, 0.1, 1e-5, false);
    if (relu) expected = torch::relu(expected);
    const torch::Tensor expected_dx =
        torch::autograd::grad({expected}, {x64}, {grad.to(torch::kDouble)})[0];
    const std::string what = relu ? "batch_norm_relu " : "batch_norm ";
    expect_close(out, expected.to(torch::kFloat), tolerance(torch::kFloat), what + "output");
    // The mask of a float32 output may differ from the float64 one where it rounds to zero,
    // and then so do that channel's sums: compare the channels whose masks agree.
    const torch::Tensor agrees =
        ((out > 0) == (expected > 0)).transpose(0, 1).reshape({channels, -1}).all(1);
    ASSERT_GT(agrees.to(torch::kFloat).mean().item<float>(), 0.9f);
    const torch::Tensor in_agreeing = agrees.view({1, -1, 1, 1}).expand_as(x0);
    expect_close(dx.masked_select(in_agreeing),
                 expected_dx.to(torch::kFloat).masked_select(in_agreeing), tolerance(torch::kFloat),
                 what + "grad_input");
  }
}

}  // namespace
}  // namespace custom_bn::testing
