// Large CPU layers. The allocator of large results (csrc/cpu/result_memory.h): freed blocks
// are reused, the cache stays under its limit, and a reused block never leaks a previous
// result's values. Results written with non-temporal stores, and training a channel at a time.
#include "cpu/kernels.h"
#include "cpu/result_memory.h"
#include "samples.h"

#include <custom_bn/custom_bn.h>

namespace custom_bn::testing {
namespace {

using cpu::ResultAllocator;

constexpr size_t kMB = size_t(1) << 20;

TEST(ResultMemory, SmallRequestsAreNotCached) {
  ResultAllocator allocator(64 * kMB, /*huge_pages=*/false);
  c10::DataPtr small = allocator.allocate(ResultAllocator::kMinCachedBytes - 1);
  ASSERT_NE(small.get(), nullptr);
  small.clear();
  EXPECT_EQ(allocator.cached_bytes(), 0u);
}

TEST(ResultMemory, FreedBlockIsReusedForTheSameSize) {
  ResultAllocator allocator(256 * kMB, /*huge_pages=*/true);
  const size_t size = ResultAllocator::kMinCachedBytes + kMB;
  c10::DataPtr first = allocator.allocate(size);
  void* const data = first.get();
  static_cast<char*>(data)[size - 1] = 1;  // the whole request is writable
  first.clear();
  EXPECT_EQ(allocator.cached_bytes(), size + kMB);  // rounded up to 2 MB pages
  c10::DataPtr second = allocator.allocate(size + kMB);
  EXPECT_EQ(second.get(), data);
  EXPECT_EQ(allocator.cached_bytes(), 0u);
}

TEST(ResultMemory, MuchLargerBlocksAreNotHandedToSmallRequests) {
  ResultAllocator allocator(256 * kMB, /*huge_pages=*/false);
  c10::DataPtr large = allocator.allocate(64 * kMB);
  void* const large_data = large.get();
  large.clear();
  c10::DataPtr small = allocator.allocate(40 * kMB);
  EXPECT_NE(small.get(), large_data);
  EXPECT_EQ(allocator.cached_bytes(), 64 * kMB);
  // Up to a quarter more than asked for is fine.
  c10::DataPtr close = allocator.allocate(52 * kMB);
  EXPECT_EQ(close.get(), large_data);
}

TEST(ResultMemory, CacheStaysUnderItsLimitDroppingTheOldest) {
  ResultAllocator allocator(80 * kMB, /*huge_pages=*/false);
  std::vector<c10::DataPtr> blocks;
  std::vector<void*> data;
  for (int i = 0; i < 3; ++i) {
    blocks.push_back(allocator.allocate(40 * kMB));
    data.push_back(blocks.back().get());
  }
  for (c10::DataPtr& block : blocks) block.clear();
  EXPECT_EQ(allocator.cached_bytes(), 80 * kMB);
  // The first freed block was dropped; the other two are handed out again, last freed first.
  c10::DataPtr again = allocator.allocate(40 * kMB);
  EXPECT_EQ(again.get(), data[2]);
  c10::DataPtr last = allocator.allocate(40 * kMB);
  EXPECT_EQ(last.get(), data[1]);
  EXPECT_EQ(allocator.cached_bytes(), 0u);

  // Larger than the whole limit: freed at once.
  allocator.allocate(96 * kMB).clear();
  EXPECT_EQ(allocator.cached_bytes(), 0u);
}

TEST(ResultMemory, ZeroLimitCachesNothing) {
  ResultAllocator allocator(0, /*huge_pages=*/false);
  allocator.allocate(40 * kMB).clear();
  EXPECT_EQ(allocator.cached_bytes(), 0u);
}

TEST(ResultMemory, ReleaseCachedFreesEverything) {
  ResultAllocator allocator(256 * kMB, /*huge_pages=*/false);
  allocator.allocate(40 * kMB).clear();
  allocator.allocate(64 * kMB).clear();
  EXPECT_EQ(allocator.cached_bytes(), 104 * kMB);
  allocator.release_cached();
  EXPECT_EQ(allocator.cached_bytes(), 0u);
}

class ResultMemoryOps : public SeededTest {};

// Outputs and input gradients come from result_allocator(), and a reused block holds the new
// result only: each call is compared with torch after a call that left other values there.
TEST_F(ResultMemoryOps, ReusedResultsMatchTorch) {
  for (bool channels_last : {false, true}) {
    const auto format =
        channels_last ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
    for (int step = 0; step < 2; ++step) {
      torch::Tensor x = torch::randn({8, 32, 96, 96}).contiguous(format).requires_grad_();
      torch::Tensor w = torch::rand({32});
      torch::Tensor b = torch::randn({32});
      torch::Tensor out = custom_bn::batch_norm(x, w, b, {}, {}, true, 0.1, 1e-5);
      ASSERT_GE(out.nbytes(), ResultAllocator::kMinCachedBytes);
      EXPECT_EQ(out.storage().allocator(), &cpu::result_allocator());
      EXPECT_TRUE(out.is_contiguous(format));
      torch::Tensor grad = torch::randn_like(x);
      torch::Tensor dx = torch::autograd::grad({out}, {x}, {grad})[0];
      EXPECT_EQ(dx.storage().allocator(), &cpu::result_allocator());

      // Against float64: at 73,728 values a channel, torch's float32 sums are the less
      // accurate side.
      torch::Tensor x64 = x.detach().to(torch::kDouble).requires_grad_();
      torch::Tensor expected = torch::batch_norm(x64, w.to(torch::kDouble), b.to(torch::kDouble),
                                                 {}, {}, true, 0.1, 1e-5, false);
      torch::Tensor expected_dx =
          torch::autograd::grad({expected}, {x64}, {grad.to(torch::kDouble)})[0];
      expect_close(out, expected.to(torch::kFloat), tolerance(torch::kFloat), "output");
      expect_close(dx, expected_dx.to(torch::kFloat), tolerance(torch::kFloat), "grad_input");
    }
  }
}

// Results larger than the last-level cache are written with non-temporal stores
// (csrc/cpu/kernels.cpp): run by run where every run is whole vectors (16x16 float32 runs,
// channels-last rows; streams_result), else as one flat array whose pairs of vectors may
// straddle two runs (14x14 and 7x7 float32 runs; map_first_flat).
// Eval mode, so that every sample's expected values follow from it alone: the first, a middle
// and the last sample are checked in float64.
TEST_F(ResultMemoryOps, ResultsLargerThanTheCacheAreRight) {
  const int64_t target_bytes = custom_bn::cpu::cache_bytes(3) * 5 / 4;
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
// L2 goes a channel at a time (csrc/cpu/kernels.h, fits_by_channel): batch_norm and
// batch_norm_relu, forward and backward, against torch in float64 (and its ReLU's mask).
TEST_F(ResultMemoryOps, TrainingAChannelAtATimeMatchesTorch) {
  const int64_t batch = 8, spatial = 16;
  const int64_t channels =
      custom_bn::cpu::cache_bytes(3) * 5 / 4 / (batch * spatial * spatial * 4) + 1;
  const torch::Tensor x0 = torch::rand({batch, channels, spatial, spatial}) * 4 - 1;
  ASSERT_TRUE(cpu::fits_by_channel(
      cpu::ChannelView{cpu::Layout::kChannelsFirst, batch, channels, spatial * spatial}, 3, 4));
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
