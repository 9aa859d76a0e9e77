// The allocator of large CPU results (csrc/cpu/result_cache.h): freed blocks are reused, the
// cache stays under its limit, and a reused block never leaks a previous result's values.
#include "cpu/plan.h"
#include "cpu/result_cache.h"
#include "samples.h"

#include <custom_bn/custom_bn.h>

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace custom_bn::testing {
namespace {

using cpu::ResultCache;

constexpr size_t kMB = size_t(1) << 20;

TEST(ResultCache, ServesLargeResultsWhileCachingIsOn) {
  ResultCache allocator(64 * kMB, /*huge_pages=*/false);
  EXPECT_FALSE(allocator.serves(ResultCache::kMinCachedBytes - 1));
  EXPECT_TRUE(allocator.serves(ResultCache::kMinCachedBytes));
  EXPECT_FALSE(ResultCache(0, false).serves(64 * kMB));
}

TEST(ResultCache, BlocksAreHugePageAlignedMappings) {
  ResultCache allocator(64 * kMB, /*huge_pages=*/true);
  for (size_t size : {size_t(1), 3 * kMB, 9 * kMB + 5}) {
    c10::DataPtr block = allocator.allocate(size);
    ASSERT_NE(block.get(), nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(block.get()) % (2 * kMB), 0u);
    static_cast<char*>(block.get())[size - 1] = 1;  // the whole request is writable
  }
}

TEST(ResultCache, FreedBlockIsReusedForTheSameSize) {
  ResultCache allocator(256 * kMB, /*huge_pages=*/true);
  const size_t size = ResultCache::kMinCachedBytes + kMB;
  c10::DataPtr first = allocator.allocate(size);
  void* const data = first.get();
  static_cast<char*>(data)[size - 1] = 1;  // the whole request is writable
  first.clear();
  EXPECT_EQ(allocator.cached_bytes(), size + kMB);  // rounded up to 2 MB pages
  c10::DataPtr second = allocator.allocate(size + kMB);
  EXPECT_EQ(second.get(), data);
  EXPECT_EQ(allocator.cached_bytes(), 0u);
}

TEST(ResultCache, MuchLargerBlocksAreNotHandedToSmallRequests) {
  ResultCache allocator(256 * kMB, /*huge_pages=*/false);
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

TEST(ResultCache, CacheStaysUnderItsLimitDroppingTheOldest) {
  ResultCache allocator(80 * kMB, /*huge_pages=*/false);
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

TEST(ResultCache, ZeroLimitCachesNothing) {
  ResultCache allocator(0, /*huge_pages=*/false);
  allocator.allocate(40 * kMB).clear();
  EXPECT_EQ(allocator.cached_bytes(), 0u);
}

TEST(ResultCache, ReleaseCachedFreesEverything) {
  ResultCache allocator(256 * kMB, /*huge_pages=*/false);
  allocator.allocate(40 * kMB).clear();
  allocator.allocate(64 * kMB).clear();
  EXPECT_EQ(allocator.cached_bytes(), 104 * kMB);
  allocator.release_cached();
  EXPECT_EQ(allocator.cached_bytes(), 0u);
}

// A process that forks while another thread holds the cache's lock: fork waits for the lock
// (pthread_atfork), so the child gets it released and can allocate. Without the handlers the
// child's copy of the lock stays held and its first allocation waits forever.
TEST(ResultCache, ForkWhileAnotherThreadHoldsTheLockDoesNotDeadlock) {
  ResultCache& allocator = cpu::result_cache();
  std::atomic<bool> holding{false};
  std::thread holder([&] {
    allocator.before_fork();  // takes the lock
    holding = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    allocator.after_fork();
  });
  while (!holding) std::this_thread::yield();
  const pid_t pid = fork();
  if (pid == 0) {
    alarm(20);  // a deadlocked child is killed, and the test fails
    c10::DataPtr block = allocator.allocate(ResultCache::kMinCachedBytes);
    block.clear();
    allocator.release_cached();
    _exit(block.get() == nullptr ? 0 : 1);
  }
  holder.join();
  ASSERT_GT(pid, 0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
}

// Several threads allocate, fill and free results above the cache's threshold at once; each
// result must hold exactly what its thread wrote, and the cache stays within its limit.
TEST(ResultCache, ConcurrentResultsStayApart) {
  ResultCache allocator(64 * kMB, /*huge_pages=*/false);
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int step = 0; step < 20; ++step) {
        const size_t bytes = (9 + (t + step) % 3) * kMB;
        c10::DataPtr block = allocator.allocate(bytes);
        auto* values = static_cast<int32_t*>(block.get());
        const size_t count = bytes / sizeof(int32_t);
        for (size_t i = 0; i < count; i += 4096) values[i] = t * 1000 + step;
        for (size_t i = 0; i < count; i += 4096) mismatches += values[i] != t * 1000 + step;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_LE(allocator.cached_bytes(), 64 * kMB);
  allocator.release_cached();
  EXPECT_EQ(allocator.cached_bytes(), 0u);
}

class ResultCacheOps : public SeededTest {};

// Outputs and input gradients come from result_cache(), and a reused block holds the new
// result only: each call is compared with torch after a call that left other values there.
// The public API (include/custom_bn/result_cache.h) sees and releases what the ops leave cached.
TEST_F(ResultCacheOps, CachedBytesAndEmptyCache) {
  custom_bn::result_cache::empty_cache();
  {
    const torch::Tensor out =
        custom_bn::batch_norm(torch::rand({8, 32, 96, 96}), {}, {}, {}, {}, true, 0.1, 1e-5);
    EXPECT_EQ(custom_bn::result_cache::cached_bytes(), 0u);
  }
  EXPECT_GE(custom_bn::result_cache::cached_bytes(), size_t(8 * 32 * 96 * 96 * 4));
  custom_bn::result_cache::empty_cache();
  EXPECT_EQ(custom_bn::result_cache::cached_bytes(), 0u);
}

TEST_F(ResultCacheOps, ReusedResultsMatchTorch) {
  for (bool channels_last : {false, true}) {
    const auto format =
        channels_last ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
    for (int step = 0; step < 2; ++step) {
      torch::Tensor x = torch::randn({8, 32, 96, 96}).contiguous(format).requires_grad_();
      torch::Tensor w = torch::rand({32});
      torch::Tensor b = torch::randn({32});
      torch::Tensor out = custom_bn::batch_norm(x, w, b, {}, {}, true, 0.1, 1e-5);
      ASSERT_TRUE(cpu::result_cache().serves(out.nbytes()));
      EXPECT_EQ(out.storage().allocator(), &cpu::result_cache());
      EXPECT_TRUE(out.is_contiguous(format));
      torch::Tensor grad = torch::randn_like(x);
      torch::Tensor dx = torch::autograd::grad({out}, {x}, {grad})[0];
      EXPECT_EQ(dx.storage().allocator(), &cpu::result_cache());

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

}  // namespace
}  // namespace custom_bn::testing
