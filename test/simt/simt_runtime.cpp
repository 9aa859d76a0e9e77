#include "simt_runtime.h"

#include <ucontext.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUSTOM_BN_ASAN_FIBERS 1
#endif

namespace custom_bn::simt {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // ASan's frames are large

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  void* fake_stack = nullptr;
  bool finished = false;
};

struct Barrier {
  int arrived = 0;
  uint64_t generation = 0;
};

// Everything about the block being run; one block at a time.
struct Block {
  Dim grid;
  int x = 0, y = 0;
  int threads = 0;
  const std::function<void()>* kernel = nullptr;
  std::vector<Fiber> fibers;
  int current = -1;
  ucontext_t scheduler;
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<double> shuffle_slots;
  std::vector<unsigned char> shared;
  std::string error;  // a kernel's exception, rethrown by launch()
};

Block* g_block = nullptr;

// Back to the scheduler, telling ASan the stack changes.
void yield_to_scheduler() {
  Block& b = *g_block;
  Fiber& f = b.fibers[b.current];
#if CUSTOM_BN_ASAN_FIBERS
  __sanitizer_start_switch_fiber(f.finished ? nullptr : &f.fake_stack, b.scheduler_stack_bottom,
                                 b.scheduler_stack_size);
#endif
  swapcontext(&f.context, &b.scheduler);
#if CUSTOM_BN_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

void fiber_main() {
  Block& b = *g_block;
#if CUSTOM_BN_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack_bottom, &b.scheduler_stack_size);
#endif
  try {
    (*b.kernel)();
  } catch (const std::exception& e) {
    if (b.error.empty()) b.error = e.what();
  }
  if (b.block_barrier.arrived > 0 && b.error.empty()) {
    b.error =
        "a thread exited while others wait at sync_block(): a barrier not every thread reaches";
  }
  b.fibers[b.current].finished = true;
  yield_to_scheduler();  // never resumed
}

void wait(Barrier& barrier, int participants) {
  const uint64_t generation = barrier.generation;
  if (++barrier.arrived == participants) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  while (barrier.generation == generation) {
    if (!g_block->error.empty()) throw std::runtime_error(g_block->error);
    yield_to_scheduler();
  }
}

// Runs fiber t until it yields. Kept out of run_block: swapcontext returns like setjmp, and
// the scheduler's loop variables must not live in the frame that calls it.
__attribute__((noinline)) void resume(Block& b, int t) {
  Fiber& f = b.fibers[t];
  b.current = t;
#if CUSTOM_BN_ASAN_FIBERS
  __sanitizer_start_switch_fiber(&b.scheduler_fake_stack, f.stack.get(), kStackBytes);
#endif
  swapcontext(&b.scheduler, &f.context);
#if CUSTOM_BN_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(b.scheduler_fake_stack, nullptr, nullptr);
#endif
}

// A fresh context at fiber_main on f's stack (out of run_block for the same reason).
__attribute__((noinline)) void prepare(Fiber& f) {
  f.finished = false;
  f.fake_stack = nullptr;
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack.get();
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main, 0);
}

void run_block(Block& b, std::mt19937_64& rng) {
  b.block_barrier = {};
  std::fill(b.warp_barriers.begin(), b.warp_barriers.end(), Barrier{});
  // Poisoned (NaN for floats), so a read before the write it needed shows in the results.
  std::fill(b.shared.begin(), b.shared.end(), 0xFF);
  for (Fiber& f : b.fibers) prepare(f);
  std::vector<int> order(b.threads);
  std::iota(order.begin(), order.end(), 0);
  for (bool running = true; running;) {
    running = false;
    std::shuffle(order.begin(), order.end(), rng);  // threads interleave in a random order
    for (int t : order) {
      if (b.fibers[t].finished) continue;
      running = true;
      resume(b, t);
    }
  }
  b.current = -1;
}

}  // namespace

void launch(Dim grid, int block_threads, size_t shared_bytes, const std::function<void()>& kernel,
            uint64_t seed) {
  if (block_threads <= 0 || block_threads > 1024 || block_threads % kWarpSize != 0) {
    throw std::invalid_argument("simt::launch: block_threads must be a multiple of 32 up to 1024");
  }
  Block b;
  b.grid = grid;
  b.threads = block_threads;
  b.kernel = &kernel;
  b.fibers.resize(block_threads);
  for (Fiber& f : b.fibers) f.stack = std::make_unique<char[]>(kStackBytes);
  b.warp_barriers.resize(block_threads / kWarpSize);
  b.shuffle_slots.resize(block_threads);
  b.shared.resize(shared_bytes);

  std::vector<Dim> blocks;
  for (int y = 0; y < grid.y; ++y) {
    for (int x = 0; x < grid.x; ++x) blocks.push_back({x, y});
  }
  std::mt19937_64 rng(seed);
  std::shuffle(blocks.begin(), blocks.end(), rng);  // blocks in a random order

  Block* outer = g_block;
  g_block = &b;
  for (const Dim& block : blocks) {
    b.x = block.x;
    b.y = block.y;
    run_block(b, rng);
    if (!b.error.empty()) break;
  }
  g_block = outer;
  if (!b.error.empty()) throw std::runtime_error("simt kernel failed: " + b.error);
}

int thread_index() { return g_block->current; }
int block_size() { return g_block->threads; }
int block_x() { return g_block->x; }
int block_y() { return g_block->y; }
int grid_x() { return g_block->grid.x; }
int grid_y() { return g_block->grid.y; }

void sync_block() { wait(g_block->block_barrier, g_block->threads); }

double shuffle_exchange(double value, int source_lane) {
  Block& b = *g_block;
  const int warp = b.current / kWarpSize;
  b.shuffle_slots[b.current] = value;
  wait(b.warp_barriers[warp], kWarpSize);
  const double result = b.shuffle_slots[warp * kWarpSize + source_lane];
  wait(b.warp_barriers[warp], kWarpSize);  // before any lane overwrites its slot again
  return result;
}

unsigned char* block_shared_memory() { return g_block->shared.data(); }
size_t block_shared_bytes() { return g_block->shared.size(); }

void throw_shared_overflow() {
  throw std::out_of_range("simt: shared_array past the block's shared memory");
}

}  // namespace custom_bn::simt
