#include "simt_runtime.h"

#include <ucontext.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "simt_memory.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUSTOM_BN_ASAN_FIBERS 1
#endif

namespace custom_bn::simt {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // ASan's frames are large
constexpr int kYieldAtLoadOneIn = 4;        // a global load hands over to another fiber

struct Block;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  void* fake_stack = nullptr;
  Block* block = nullptr;
  int thread = 0;
  bool finished = false;
};

struct Barrier {
  int arrived = 0;
  uint64_t generation = 0;
  std::vector<Fiber*> waiting;
};

// One resident block: a slot that runs the grid's blocks one after another.
struct Block {
  int x = 0, y = 0, id = 0;
  std::vector<Fiber> fibers;
  int unfinished = 0;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<double> shuffle_slots;
  std::vector<unsigned char> shared;
};

struct Launch {
  Dim grid;
  int threads = 0;
  const std::function<void()>* kernel = nullptr;
  std::mt19937_64 rng;
  std::vector<std::unique_ptr<Block>> slots;
  std::vector<Dim> pending;      // blocks not started yet, in the order they start
  std::vector<Fiber*> runnable;  // not finished, not waiting at a barrier
  Fiber* current = nullptr;
  ucontext_t scheduler;
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  std::string error;  // a kernel's exception, rethrown by launch()
  detail::GlobalMemory memory;

  explicit Launch(Dim g) : grid(g), memory(g) {}
};

Launch* g_launch = nullptr;

Fiber& current_fiber() { return *g_launch->current; }
Block& current_block() { return *g_launch->current->block; }

// Back to the scheduler, telling ASan the stack changes.
void yield_to_scheduler() {
  Launch& l = *g_launch;
  Fiber& f = *l.current;
#if CUSTOM_BN_ASAN_FIBERS
  __sanitizer_start_switch_fiber(f.finished ? nullptr : &f.fake_stack, l.scheduler_stack_bottom,
                                 l.scheduler_stack_size);
#endif
  swapcontext(&f.context, &l.scheduler);
#if CUSTOM_BN_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

// Every fiber waiting at a barrier runs again (to see the error and leave).
void wake_all_waiting() {
  const auto wake = [](Barrier& barrier) {
    for (Fiber* f : barrier.waiting) g_launch->runnable.push_back(f);
    barrier.waiting.clear();
  };
  for (auto& slot : g_launch->slots) {
    wake(slot->block_barrier);
    for (Barrier& barrier : slot->warp_barriers) wake(barrier);
  }
}

void fail(std::string message) {
  if (g_launch->error.empty()) g_launch->error = std::move(message);
  wake_all_waiting();
}

void fiber_main() {
  Launch& l = *g_launch;
#if CUSTOM_BN_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(nullptr, &l.scheduler_stack_bottom, &l.scheduler_stack_size);
#endif
  try {
    (*l.kernel)();
  } catch (const std::exception& e) {
    fail(e.what());
  }
  Fiber& f = current_fiber();
  if (f.block->block_barrier.arrived > 0) {
    fail("a thread exited while others wait at sync_block(): a barrier not every thread reaches");
  }
  f.finished = true;
  yield_to_scheduler();  // never resumed
}

void wait(Barrier& barrier, int participants) {
  const uint64_t generation = barrier.generation;
  if (++barrier.arrived == participants) {
    barrier.arrived = 0;
    ++barrier.generation;
    for (Fiber* f : barrier.waiting) g_launch->runnable.push_back(f);
    barrier.waiting.clear();
    return;
  }
  while (barrier.generation == generation) {
    if (!g_launch->error.empty()) throw std::runtime_error(g_launch->error);
    barrier.waiting.push_back(g_launch->current);
    yield_to_scheduler();
  }
}

// Runs fiber f until it yields. Kept out of the scheduler loop: swapcontext returns like
// setjmp, and the loop's variables must not live in the frame that calls it.
__attribute__((noinline)) void resume(Fiber& f) {
  Launch& l = *g_launch;
  l.current = &f;
#if CUSTOM_BN_ASAN_FIBERS
  __sanitizer_start_switch_fiber(&l.scheduler_fake_stack, f.stack.get(), kStackBytes);
#endif
  swapcontext(&l.scheduler, &f.context);
#if CUSTOM_BN_ASAN_FIBERS
  __sanitizer_finish_switch_fiber(l.scheduler_fake_stack, nullptr, nullptr);
#endif
}

// A fresh context at fiber_main on f's stack (out of the loop for the same reason).
__attribute__((noinline)) void prepare(Fiber& f) {
  f.finished = false;
  f.fake_stack = nullptr;
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack.get();
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main, 0);
}

// Starts the next pending block in `slot`; false when none is left.
bool start_next_block(Launch& l, Block& slot) {
  if (l.pending.empty()) return false;
  const Dim next = l.pending.back();
  l.pending.pop_back();
  slot.x = next.x;
  slot.y = next.y;
  slot.id = next.y * l.grid.x + next.x;
  slot.unfinished = l.threads;
  slot.block_barrier = {};
  std::fill(slot.warp_barriers.begin(), slot.warp_barriers.end(), Barrier{});
  // Poisoned (NaN for floats), so a read before the write it needed shows in the results.
  std::fill(slot.shared.begin(), slot.shared.end(), 0xFF);
  for (Fiber& f : slot.fibers) {
    prepare(f);
    l.runnable.push_back(&f);
  }
  return true;
}

// Runs fibers of the resident blocks, a random runnable one at a time, until every block of
// the grid has finished. A block that finishes makes room for the next.
void run_grid(Launch& l) {
  for (auto& slot : l.slots) start_next_block(l, *slot);
  while (!l.runnable.empty()) {
    const size_t pick = std::uniform_int_distribution<size_t>(0, l.runnable.size() - 1)(l.rng);
    Fiber* f = l.runnable[pick];
    l.runnable[pick] = l.runnable.back();
    l.runnable.pop_back();
    resume(*f);
    // Unless it finished, it has put itself back: as runnable, or as waiting at a barrier.
    if (!f->finished) continue;
    Block& block = *f->block;
    if (--block.unfinished == 0) {
      l.memory.finish_block(block.id);
      if (l.error.empty()) start_next_block(l, block);
    }
  }
  l.current = nullptr;
  const bool stuck = std::any_of(l.slots.begin(), l.slots.end(),
                                 [](const auto& slot) { return slot->unfinished > 0; });
  if (stuck && l.error.empty()) {
    // Every thread left waits at a barrier that the others will never reach.
    l.error = "deadlock: every unfinished thread waits at a barrier (sync_block or a shuffle)";
  }
}

// Hands over to the scheduler while staying runnable.
void yield_runnable() {
  g_launch->runnable.push_back(g_launch->current);
  yield_to_scheduler();
}

}  // namespace

void launch(Dim grid, int block_threads, size_t shared_bytes, const std::function<void()>& kernel,
            uint64_t seed) {
  if (block_threads <= 0 || block_threads > 1024 || block_threads % kWarpSize != 0) {
    throw std::invalid_argument("simt::launch: block_threads must be a multiple of 32 up to 1024");
  }
  Launch l(grid);
  l.threads = block_threads;
  l.kernel = &kernel;
  l.rng.seed(seed);
  for (int y = 0; y < grid.y; ++y) {
    for (int x = 0; x < grid.x; ++x) l.pending.push_back({x, y});
  }
  std::shuffle(l.pending.begin(), l.pending.end(), l.rng);  // blocks start in a random order
  const int resident = std::min<int>(kResidentBlocks, static_cast<int>(l.pending.size()));
  for (int s = 0; s < resident; ++s) {
    auto slot = std::make_unique<Block>();
    slot->fibers.resize(block_threads);
    for (int t = 0; t < block_threads; ++t) {
      slot->fibers[t].stack = std::make_unique<char[]>(kStackBytes);
      slot->fibers[t].block = slot.get();
      slot->fibers[t].thread = t;
    }
    slot->warp_barriers.resize(block_threads / kWarpSize);
    slot->shuffle_slots.resize(block_threads);
    slot->shared.resize(shared_bytes);
    l.slots.push_back(std::move(slot));
  }

  Launch* outer = g_launch;
  g_launch = &l;
  run_grid(l);
  g_launch = outer;
  l.memory.finish_kernel();
  if (!l.error.empty()) throw std::runtime_error("simt kernel failed: " + l.error);
  if (!l.memory.violations().empty()) {
    std::string message = "simt memory model:";
    for (const std::string& v : l.memory.violations()) message += "\n  " + v;
    throw std::runtime_error(message);
  }
}

int thread_index() { return current_fiber().thread; }
int block_size() { return g_launch->threads; }
int block_x() { return current_block().x; }
int block_y() { return current_block().y; }
int grid_x() { return g_launch->grid.x; }
int grid_y() { return g_launch->grid.y; }

void sync_block() { wait(current_block().block_barrier, g_launch->threads); }

double shuffle_exchange(double value, int source_lane) {
  Block& b = current_block();
  const int thread = thread_index();
  const int warp = thread / kWarpSize;
  b.shuffle_slots[thread] = value;
  wait(b.warp_barriers[warp], kWarpSize);
  const double result = b.shuffle_slots[warp * kWarpSize + source_lane];
  wait(b.warp_barriers[warp], kWarpSize);  // before any lane overwrites its slot again
  return result;
}

namespace {

// simt::load and store also reach the block's shared memory (the accumulators' load and store
// serve both): that is the block's own, outside the model of global memory.
bool in_shared_memory(const void* address) {
  const std::vector<unsigned char>& shared = current_block().shared;
  const auto* p = static_cast<const unsigned char*>(address);
  return !shared.empty() && p >= shared.data() && p < shared.data() + shared.size();
}

}  // namespace

void global_load(const void* address, void* value, size_t bytes) {
  if (in_shared_memory(address)) {
    std::memcpy(value, address, bytes);
    return;
  }
  if (std::uniform_int_distribution<int>(1, kYieldAtLoadOneIn)(g_launch->rng) == 1) {
    yield_runnable();
  }
  g_launch->memory.load(current_block().id, address, value, bytes);
}

void global_store(void* address, const void* value, size_t bytes) {
  if (in_shared_memory(address)) {
    std::memcpy(address, value, bytes);
    return;
  }
  g_launch->memory.store(current_block().id, thread_index(), address, value, bytes);
}

void thread_fence() {
  g_launch->memory.fence(current_block().id, thread_index());
  yield_runnable();
}

void atomic_order(void* address) {
  yield_runnable();  // other blocks may reach the same counter first
  g_launch->memory.atomic(current_block().id, address);
}

unsigned char* block_shared_memory() { return current_block().shared.data(); }
size_t block_shared_bytes() { return current_block().shared.size(); }

void throw_shared_overflow() {
  throw std::out_of_range("simt: shared_array past the block's shared memory");
}

}  // namespace custom_bn::simt
