// A host emulator of the SIMT model for the kernels in csrc/cuda/kernels/: each CUDA thread
// is a fiber (ucontext) on one OS thread; a block's fibers share its shared memory;
// sync_block() is a barrier over the block; warp shuffles exchange values across a warp's
// lanes; blocks run one after another, in a random order. Built with AddressSanitizer, the
// emulator tells it about every stack switch, so out-of-bounds accesses in a kernel are
// reported with the kernel's own frames.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <random>

namespace custom_bn::simt {

constexpr int kWarpSize = 32;

struct Dim {
  int x = 1, y = 1;
};

// Runs `kernel` (the body of one thread) for every thread of every block of the grid.
// shared_bytes: the block's dynamic shared memory. seed: the order of blocks.
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
inline void thread_fence() {}

// Shuffles: every lane of the warp must call; each deposits its value and reads its
// partner's, between two warp-wide barriers.
double shuffle_exchange(double value, int source_lane);

template <typename T>
T shuffle_down(T value, int delta) {
  const int lane = thread_index() % kWarpSize;
  const int source = lane + delta < kWarpSize ? lane + delta : lane;
  return static_cast<T>(shuffle_exchange(static_cast<double>(value), source));
}

// One OS thread runs every fiber, so an atomic is a plain read-modify-write.
template <typename T>
T atomic_add(T* address, T value) {
  const T old = *address;
  *address = old + value;
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
