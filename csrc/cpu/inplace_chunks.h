// The chunks the CPU steps of in-place activated batch norm walk (csrc/cpu/inplace.cpp, the
// forward; csrc/cpu/inplace_backward.cpp, the backward): memory in chunks of kChunk elements,
// in parallel, over tensors that are dense and share their strides (the layouts models train
// in: contiguous, channels_last). Any other layout takes the generic steps.
#pragma once

#include "cpu/inplace_loops.h"
#include "cpu/parallel.h"
#include "inplace.h"
#include "optional_tensor.h"

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace custom_bn::cpu {

constexpr int64_t kChunk = int64_t{1} << 15;

inline bool walks_memory(const at::Tensor& input, const at::Tensor& other,
                         const std::optional<at::Tensor>& residual) {
  return input.is_non_overlapping_and_dense() && other.strides() == input.strides() &&
         (!has(residual) || residual->strides() == input.strides());
}

// The memory of a dense (N, C, *) tensor in chunks of kChunk elements, each walked as runs
// f(i0, i1, c) of one channel c (stride > 1) or as runs f(i0, i1, -1) of consecutive channels
// starting at channel i0 % C (channels_last, stride 1).
struct ChunkWalk {
  int64_t numel, channels, stride;

  explicit ChunkWalk(const at::Tensor& t)
      : numel(t.numel()), channels(t.size(1)), stride(t.size(1) > 1 ? t.stride(1) : 1) {}

  int64_t chunks() const { return (numel + kChunk - 1) / kChunk; }
  int64_t begin(int64_t index) const { return index * kChunk; }
  int64_t end(int64_t index) const { return std::min(numel, begin(index) + kChunk); }

  template <typename F>
  void chunk(int64_t index, const F& f) const {
    const int64_t begin = this->begin(index), end = this->end(index);
    if (stride == 1) {
      for (int64_t i = begin; i < end;) {
        const int64_t row_end = std::min(end, i + channels - i % channels);
        f(i, row_end, int64_t{-1});
        i = row_end;
      }
      return;
    }
    int64_t c = (begin / stride) % channels;
    for (int64_t i = begin; i < end;) {
      const int64_t run_end = std::min(end, i + stride - i % stride);
      f(i, run_end, c);
      i = run_end;
      if (++c == channels) c = 0;
    }
  }
};

// A scratch of at least `values` elements that belongs to the calling thread and lives as long
// as it: a chunk's output (the forward) or x_hat (the backward), computed where it stays in
// cache. Kept across calls, so that a call neither allocates nor zeroes it; in a parallel
// region each thread uses only its own, and one piece's use of it ends before the next piece's.
template <typename scalar_t>
scalar_t* thread_scratch(int64_t values) {
  thread_local std::vector<scalar_t> scratch;
  if (static_cast<int64_t>(scratch.size()) < values) scratch.resize(values);
  return scratch.data();
}

// The output values of chunk `index`, from y[0]: index -> pointer. Either an output tensor's
// memory or the chunk computed into the thread's scratch (training_forward).
template <typename scalar_t>
auto output_tensor_values(const ChunkWalk& walk, const scalar_t* y) {
  return [&walk, y](int64_t index) { return y + walk.begin(index); };
}

// The kept positions before each chunk (and the total, last).
template <typename scalar_t, typename OutputOf>
std::vector<int64_t> kept_offsets(const KeepRule<scalar_t>& rule, const ChunkWalk& walk,
                                  const OutputOf& output_of, const scalar_t* r) {
  const int64_t chunks = walk.chunks();
  std::vector<int64_t> offsets(chunks + 1, 0);
  if (rule.keeps_none()) return offsets;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t index = first; index < last; ++index) {
      const scalar_t* y = output_of(index);
      const int64_t begin = walk.begin(index);
      int64_t count = 0;
      walk.chunk(index, [&](int64_t i0, int64_t i1, int64_t c) {
        count += kept_count(rule, y + (i0 - begin), r, i0, i1, c, walk.channels);
      });
      offsets[index + 1] = count;
    }
  });
  for (int64_t index = 0; index < chunks; ++index) offsets[index + 1] += offsets[index];
  return offsets;
}

// x_hat recovered a chunk at a time from the output and the kept input values (the recovery of
// csrc/cpu/inplace_loops.h), once the kept values before each chunk are counted.
template <typename scalar_t>
class ChunkRecovery {
 public:
  ChunkRecovery(const char* op, const ChunkWalk& walk, const at::Tensor& output,
                const at::Tensor& kept_input, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                const at::Tensor& mean, const at::Tensor& invstd, const Activation& act)
      : walk_(walk),
        rule_(act, weight, bias, has(residual), walk.channels),
        params_(weight, bias, mean, invstd, act, walk.channels),
        y_(output.const_data_ptr<scalar_t>()),
        r_(has(residual) ? residual->const_data_ptr<scalar_t>() : nullptr),
        offsets_(kept_offsets(rule_, walk, output_tensor_values(walk, y_), r_)),
        last_kept_(std::max<int64_t>(kept_input.numel() - 1, 0)) {
    check_kept_count(op, offsets_.back(), kept_input);
    // An empty kept_input is never read at a kept position, but recover reads an index anyway.
    kept_ = kept_input.numel() > 0 ? kept_input.const_data_ptr<scalar_t>() : &no_value_;
  }
  ChunkRecovery(const ChunkRecovery&) = delete;
  ChunkRecovery& operator=(const ChunkRecovery&) = delete;

  // x_hat of chunk `index` into out[0, its length).
  void chunk(int64_t index, scalar_t* out) const {
    const int64_t begin = walk_.begin(index);
    int64_t next = offsets_[index];
    walk_.chunk(index, [&](int64_t i0, int64_t i1, int64_t c) {
      next =
          recover(rule_, y_, r_, kept_, last_kept_, next, i0, i1, c, params_, out + (i0 - begin));
    });
  }

 private:
  const ChunkWalk& walk_;
  KeepRule<scalar_t> rule_;
  RecoveryParams<scalar_t> params_;
  const scalar_t* y_;
  const scalar_t* r_;
  std::vector<int64_t> offsets_;
  int64_t last_kept_;
  scalar_t no_value_ = scalar_t(0);
  const scalar_t* kept_;
};

// The backward's step (csrc/inplace.h's InplaceSteps::backward), on the CPU.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>> inplace_backward(
    const char* op, const at::Tensor& grad_output, const at::Tensor& output,
    const at::Tensor& kept_input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const at::Tensor& mean, const at::Tensor& invstd, bool training,
    std::array<bool, 4> output_mask, const Activation& act);

}  // namespace custom_bn::cpu
