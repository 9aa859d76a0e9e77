// The device kernels of in-place activated batch norm (csrc/inplace.h), written once against
// csrc/cuda/simt.h like batch_norm.cuh: nvcc compiles them for the GPU, the host compiler for
// test/simt.
//
// The kept input values are in memory order. Memory is cut into chunks of consecutive
// elements, one block each, and a block's chunk into one run of consecutive elements per
// thread: the count kernel writes each chunk's kept count; the host turns the counts into each
// chunk's first index in kept_input (a prefix sum); the gather and recovery kernels count each
// thread's run again, scan the runs' counts in shared memory, and walk each run in order from
// its first index. Each element is read and written by one thread of one block.
//
// Float and double only: bfloat16 and float16 keep every input value and never come here
// (keeps_every_value).
#pragma once

#include "channel_view.h"
#include "cuda/kernels/batch_norm.cuh"
#include "cuda/simt.h"

#include <cstdint>

namespace custom_bn::kernels {

// kept_positions (csrc/inplace.cpp) for one element, in the same float operations: the output
// at a flat bound of the activation or infinite, or recovery unsafe: |bias| + |residual| not
// below 4 |weight| (with neither an offset, weight 0).
template <typename T>
struct KeepRule {
  T lower;          // -inf where the activation is not flat below
  T upper;          // +inf without an upper bound
  T margin;         // kRecoveryMargin
  const T* weight;  // null: no weight
  const T* bias;    // null: no bias
  bool residual;

  CUSTOM_BN_DEVICE bool kept(T y, T r, int64_t c) const {
    if (y <= lower || y >= upper) return true;
    const T w = weight != nullptr ? simt::load(weight + c) : T(1);
    if (bias == nullptr && !residual) return weight != nullptr && w == T(0);
    const T scale = (w < T(0) ? -w : w) * margin;
    T offset = T(0);
    if (bias != nullptr) {
      const T b = simt::load(bias + c);
      offset = b < T(0) ? -b : b;
    }
    if (residual) offset = bias != nullptr ? offset + (r < T(0) ? -r : r) : (r < T(0) ? -r : r);
    return !(scale > offset);
  }
};

// The elements [begin, end) of this thread: a block's chunk of `chunk` elements, one run of
// consecutive elements per thread.
struct Run {
  int64_t begin, end;
};

CUSTOM_BN_DEVICE Run thread_run(int64_t numel, int64_t chunk) {
  const int64_t chunk_begin = static_cast<int64_t>(simt::block_x()) * chunk;
  const int64_t chunk_end = chunk_begin + chunk < numel ? chunk_begin + chunk : numel;
  const int64_t threads = simt::block_size();
  const int64_t per_thread = (chunk + threads - 1) / threads;
  const int64_t begin = chunk_begin + simt::thread_index() * per_thread;
  const int64_t end = begin + per_thread < chunk_end ? begin + per_thread : chunk_end;
  return {begin < chunk_end ? begin : chunk_end, end};
}

template <typename T>
CUSTOM_BN_DEVICE int64_t count_run(const KeepRule<T>& rule, const ChannelView& view,
                                   const T* output, const T* residual, const Run& run) {
  int64_t count = 0;
  for (int64_t i = run.begin; i < run.end; ++i) {
    const T r = residual != nullptr ? simt::load(residual + i) : T(0);
    count += rule.kept(simt::load(output + i), r, channel_of<int64_t>(view, i)) ? 1 : 0;
  }
  return count;
}

// Each thread's count, then (block_size() values of shared memory) the index of its first kept
// value within the block's chunk; thread 0 also gets the chunk's total.
template <typename T>
CUSTOM_BN_DEVICE int64_t run_start(const KeepRule<T>& rule, const ChannelView& view,
                                   const T* output, const T* residual, const Run& run,
                                   int64_t* total) {
  int shared_offset = 0;
  int64_t* counts = simt::shared_array<int64_t>(simt::block_size(), shared_offset);
  counts[simt::thread_index()] = count_run(rule, view, output, residual, run);
  simt::sync_block();
  if (simt::thread_index() == 0) {
    int64_t sum = 0;
    for (int t = 0; t < simt::block_size(); ++t) {
      const int64_t count = counts[t];
      counts[t] = sum;
      sum += count;
    }
    *total = sum;
  }
  simt::sync_block();
  return counts[simt::thread_index()];
}

template <typename T>
CUSTOM_BN_DEVICE void count_kept(const KeepRule<T>& rule, const ChannelView& view, int64_t numel,
                                 int64_t chunk, const T* output, const T* residual,
                                 int64_t* chunk_counts) {
  int64_t total = 0;
  run_start(rule, view, output, residual, thread_run(numel, chunk), &total);
  if (simt::thread_index() == 0) simt::store(chunk_counts + simt::block_x(), total);
}

// Writes the output over the input, and the input values at kept positions to kept_input from
// chunk_starts[block].
template <typename T>
CUSTOM_BN_DEVICE void gather_kept(const KeepRule<T>& rule, const ChannelView& view, int64_t numel,
                                  int64_t chunk, T* input, const T* output, const T* residual,
                                  const int64_t* chunk_starts, T* kept_input) {
  const Run run = thread_run(numel, chunk);
  int64_t total = 0;
  int64_t next = simt::load(chunk_starts + simt::block_x()) +
                 run_start(rule, view, output, residual, run, &total);
  for (int64_t i = run.begin; i < run.end; ++i) {
    const T y = simt::load(output + i);
    const T r = residual != nullptr ? simt::load(residual + i) : T(0);
    if (rule.kept(y, r, channel_of<int64_t>(view, i)))
      simt::store(kept_input + next++, simt::load(input + i));
    simt::store(input + i, y);
  }
}

// The activation's inverse where its slope is not 0 (csrc/inplace.cpp's normalized_input).
template <typename T>
struct Recovery {
  T lower, slope;
  const T* weight;  // null: 1
  const T* bias;    // null: 0
  const T* mean;
  const T* invstd;

  CUSTOM_BN_DEVICE T from_output(T y, T r, bool residual, int64_t c) const {
    T z = y;
    if (slope != T(0) && slope != T(1) && y <= lower) z = (y - lower) / slope + lower;
    if (bias != nullptr) z = z - simt::load(bias + c);
    if (residual) z = z - r;
    return weight != nullptr ? z / simt::load(weight + c) : z;
  }

  CUSTOM_BN_DEVICE T from_input(T x, int64_t c) const {
    return (x - simt::load(mean + c)) * simt::load(invstd + c);
  }
};

// x_hat at every position: from kept_input where the rule kept, else from the output.
template <typename T>
CUSTOM_BN_DEVICE void recover_normalized(const KeepRule<T>& rule, const Recovery<T>& recovery,
                                         const ChannelView& view, int64_t numel, int64_t chunk,
                                         const T* output, const T* residual,
                                         const int64_t* chunk_starts, const T* kept_input,
                                         T* x_hat) {
  const Run run = thread_run(numel, chunk);
  int64_t total = 0;
  int64_t next = simt::load(chunk_starts + simt::block_x()) +
                 run_start(rule, view, output, residual, run, &total);
  for (int64_t i = run.begin; i < run.end; ++i) {
    const int64_t c = channel_of<int64_t>(view, i);
    const T y = simt::load(output + i);
    const T r = residual != nullptr ? simt::load(residual + i) : T(0);
    const T value = rule.kept(y, r, c) ? recovery.from_input(simt::load(kept_input + next++), c)
                                       : recovery.from_output(y, r, residual != nullptr, c);
    simt::store(x_hat + i, value);
  }
}

}  // namespace custom_bn::kernels
