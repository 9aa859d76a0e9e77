// The emulator can fail. Its model of global memory between blocks (simt_memory.h): the
// last-block-finishes reduction that the real kernels use, with one piece of its ordering
// removed at a time, is caught under every seed; the pattern as written passes. Its other
// checks: a missing barrier, an out-of-bounds write (ASan), a barrier half a block reaches.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "simt_runtime.h"

namespace custom_bn::testing {
namespace {

constexpr int kBlocks = 6;
constexpr int kSeeds = 24;
constexpr double kExpectedSum = kBlocks * (kBlocks + 1) / 2.0;

// What to break in the pattern.
struct Variant {
  bool fence_before_count = true;     // publishes the partial before the arrival is counted
  bool fence_after_count = true;      // the last block orders its reads after the count
  bool one_shared_partial = false;    // every block writes partial 0
  int merging_arrival = kBlocks - 1;  // which arrival merges: kBlocks - 2 merges too early
};

struct Outcome {
  double sum = std::nan("");
  std::string error;  // empty: the launch passed
};

// Each block writes partial[b] = b + 1 and counts its arrival; the block whose arrival is
// `merging_arrival` sums the partials. Partials start as NaN: a read of one not yet visible
// shows in the sum.
Outcome last_block_sum(const Variant& v, uint64_t seed) {
  std::vector<double> partials(kBlocks, std::nan(""));
  int arrivals = 0;
  Outcome outcome;
  try {
    simt::launch(
        {kBlocks, 1}, 32, 0,
        [&] {
          if (simt::thread_index() != 0) return;
          const int b = simt::block_x();
          simt::store(partials.data() + (v.one_shared_partial ? 0 : b), b + 1.0);
          if (v.fence_before_count) simt::thread_fence();
          if (simt::atomic_add(&arrivals, 1) != v.merging_arrival) return;
          if (v.fence_after_count) simt::thread_fence();
          double sum = 0;
          for (int j = 0; j < kBlocks; ++j) sum += simt::load(partials.data() + j);
          outcome.sum = sum;  // host memory, read after the launch
        },
        seed);
  } catch (const std::runtime_error& e) {
    outcome.error = e.what();
  }
  return outcome;
}

TEST(SimtMemoryModel, TheLastBlockPatternPassesUnderEverySeed) {
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    const Outcome o = last_block_sum({}, seed);
    EXPECT_EQ(o.error, "") << "seed " << seed;
    EXPECT_EQ(o.sum, kExpectedSum) << "seed " << seed;
  }
}

// Every seed's launch of the variant fails with a report that says `what`.
void expect_reported(const Variant& v, const std::string& what) {
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    const Outcome o = last_block_sum(v, seed);
    EXPECT_NE(o.error.find(what), std::string::npos) << "seed " << seed << ": " << o.error;
    if (!v.fence_before_count) {
      // The last block saw the other blocks' partials as memory held them (NaN).
      EXPECT_TRUE(std::isnan(o.sum)) << "seed " << seed;
    }
  }
}

TEST(SimtMemoryModel, CatchesAMissingFenceBeforeTheCount) {
  Variant v;
  v.fence_before_count = false;
  expect_reported(v, "has not fenced");
}

TEST(SimtMemoryModel, CatchesAMissingFenceAfterTheCount) {
  Variant v;
  v.fence_after_count = false;
  expect_reported(v, "without synchronizing");
}

TEST(SimtMemoryModel, CatchesTwoBlocksWritingOnePartial) {
  Variant v;
  v.one_shared_partial = true;
  expect_reported(v, "both wrote");
}

TEST(SimtMemoryModel, CatchesAReadBeforeTheCounterSaysDone) {
  // The next-to-last arrival merges: the last block's partial is either not written yet
  // (the sum holds its NaN) or written without the order that would make it visible.
  Variant v;
  v.merging_arrival = kBlocks - 2;
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    const Outcome o = last_block_sum(v, seed);
    EXPECT_TRUE(!o.error.empty() || std::isnan(o.sum)) << "seed " << seed;
  }
}

TEST(SimtMemoryModel, BlocksRunInterleaved) {
  // Block b logs its start, then its end after an atomic (a point where others may run).
  int overlapping_runs = 0;
  for (uint64_t seed = 0; seed < 8; ++seed) {
    std::vector<int> log;  // +b+1 at the start, -(b+1) at the end
    int counter = 0;
    simt::launch(
        {kBlocks, 1}, 32, 0,
        [&] {
          if (simt::thread_index() != 0) return;
          log.push_back(simt::block_x() + 1);
          simt::atomic_add(&counter, 1);
          log.push_back(-(simt::block_x() + 1));
        },
        seed);
    ASSERT_EQ(log.size(), 2u * kBlocks);
    int running = 0, most = 0;
    for (int event : log) most = std::max(most, running += event > 0 ? 1 : -1);
    if (most > 1) ++overlapping_runs;
  }
  EXPECT_GT(overlapping_runs, 0) << "some seed must run two blocks at once";
}

TEST(SimtMemoryModel, AStoreIsVisibleToItsOwnBlockAtOnce) {
  double value = 0, seen = -1;
  simt::launch({2, 1}, 32, 0, [&] {
    if (simt::thread_index() != 0 || simt::block_x() != 0) return;
    simt::store(&value, 42.0);
    seen = simt::load(&value);
  });
  EXPECT_EQ(seen, 42.0);
  EXPECT_EQ(value, 42.0) << "every store reaches memory at the kernel's end";
}

// ---- barriers and bounds ---------------------------------------------------------------------

// Sums a block's thread indices through shared memory; `synchronized` false drops the barrier.
double shared_sum(bool synchronized, uint64_t seed) {
  double result = 0;
  simt::launch(
      {1, 1}, 64, 64 * sizeof(double),
      [&] {
        int offset = 0;
        double* slots = simt::shared_array<double>(64, offset);
        slots[simt::thread_index()] = simt::thread_index();
        if (synchronized) simt::sync_block();
        if (simt::thread_index() == 0) {
          double sum = 0;
          for (int i = 0; i < 64; ++i) sum += slots[i];
          result = sum;
        }
      },
      seed);
  return result;
}

TEST(SimtHarness, CatchesAMissingSyncthreads) {
  int wrong = 0;
  for (uint64_t seed = 0; seed < 8; ++seed) {
    EXPECT_EQ(shared_sum(true, seed), 64 * 63 / 2);
    if (shared_sum(false, seed) != 64 * 63 / 2) ++wrong;
  }
  EXPECT_GT(wrong, 0) << "without the barrier, some thread order must expose the race";
}

TEST(SimtHarness, CatchesAnOutOfBoundsWrite) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        std::vector<float> buffer(64);
        float* data = buffer.data();
        volatile int past_the_end = 64;  // not provably dead: the store must happen
        simt::launch({2, 1}, 32, 0, [&] {
          if (simt::block_x() == 1 && simt::thread_index() == 31) data[past_the_end] = 1.0f;
        });
      },
      "heap-buffer-overflow");
}

TEST(SimtHarness, CatchesADeadlock) {
  // Half of the second warp waits inside a shuffle that its other half never joins, and they
  // wait at sync_block() with the first warp: no barrier can complete, and no thread exits.
  try {
    simt::launch({1, 1}, 64, 0, [] {
      if (simt::thread_index() >= 32 && simt::thread_index() < 48) simt::shuffle_down(1.0, 1);
      simt::sync_block();
    });
    ADD_FAILURE() << "the launch returned";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("deadlock"), std::string::npos) << e.what();
  }
}

TEST(SimtHarness, CatchesABarrierNotEveryThreadReaches) {
  EXPECT_THROW(simt::launch({1, 1}, 64, 0,
                            [] {
                              if (simt::thread_index() < 32) simt::sync_block();
                            }),
               std::runtime_error);
}

}  // namespace
}  // namespace custom_bn::testing
