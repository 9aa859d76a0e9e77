// A host emulator of the SIMT model for the kernels in csrc/cuda/kernels/: each CUDA thread
// is a fiber (ucontext) on one OS thread; a block's fibers share its shared memory;
// sync_block() is a barrier over the block; warp shuffles exchange values across a warp's
// lanes. Several blocks are resident at once and their fibers interleave at barriers, atomics,
// fences and global loads, in an order drawn from the seed.
//
// Global memory is weakly ordered between blocks, as on a GPU (simt_memory.cpp): a block's
// stores through simt::store stay in its own buffer until the storing thread's fence (or the
// kernel's end), so another block reads the old value until then; and a shadow record of
// every location written reports a location written by two blocks, or read by one block
// after another wrote it without the fence-atomic-fence chain that orders the two. Such a
// report, like an exception in a kernel, makes launch() throw.
//
// Built with AddressSanitizer, the emulator tells it about every stack switch, so
// out-of-bounds accesses in a kernel are reported with the kernel's own frames.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>

namespace custom_bn::simt {

constexpr int kWarpSize = 32;
constexpr int kResidentBlocks = 4;  // blocks running at once (fewer when the grid is smaller)

struct Dim {
  int x = 1, y = 1;
};

// Runs `kernel` (the body of one thread) for every thread of every block of the grid.
// shared_bytes: the block's dynamic shared memory. seed: the order of blocks and threads.
void launch(Dim grid, int block_threads, size_t shared_bytes, const std::function<void()>& kernel,
            uint64_t seed = std::random_device{}());

// What a kernel sees of the thread it runs as.
int thread_index();
int block_size();
int block_x();
int block_y();
int grid_x();
int grid_y();
void sync_block();
void thread_fence();

// Shuffles: every lane of the warp must call; each deposits its value and reads its
// partner's, between two warp-wide barriers.
double shuffle_exchange(double value, int source_lane);

template <typename T>
T shuffle_down(T value, int delta) {
  const int lane = thread_index() % kWarpSize;
  const int source = lane + delta < kWarpSize ? lane + delta : lane;
  return static_cast<T>(shuffle_exchange(static_cast<double>(value), source));
}

// Global memory through the memory model (simt_memory.cpp).
void global_load(const void* address, void* value, size_t bytes);
void global_store(void* address, const void* value, size_t bytes);
// An atomic's ordering: it releases what this block has fenced, and what other blocks
// released through `address` becomes this block's at its next fence.
void atomic_order(void* address);

template <typename T>
T load(const T* address) {
  T value;
  global_load(address, &value, sizeof(T));
  return value;
}

template <typename T>
void store(T* address, const T& value) {
  global_store(address, &value, sizeof(T));
}

// Atomics act on memory itself (they are coherent on a GPU); one OS thread runs every fiber,
// so the read-modify-write cannot be interrupted.
template <typename T>
T atomic_add(T* address, T value) {
  atomic_order(address);
  T old;
  std::memcpy(&old, address, sizeof(T));
  const T updated = old + value;
  std::memcpy(address, &updated, sizeof(T));
  return old;
}

unsigned char* block_shared_memory();
size_t block_shared_bytes();
[[noreturn]] void throw_shared_overflow();

// The block's shared memory, carved in declaration order (every thread declares alike).
template <typename T>
T* shared_array(int count, int& offset) {
  T* result = reinterpret_cast<T*>(block_shared_memory() + offset);
  offset += static_cast<int>(sizeof(T)) * count;
  if (static_cast<size_t>(offset) > block_shared_bytes()) throw_shared_overflow();
  return result;
}

}  // namespace custom_bn::simt
