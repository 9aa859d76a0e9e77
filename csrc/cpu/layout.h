// Putting CPU tensors into a layout the kernels walk (see ChannelView).
#pragma once

#include "cpu/kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

namespace custom_bn::cpu {

// A tensor the kernels can walk, and how. `tensor` is the input itself when it is
// channels-first or channels-last dense, else a copy in its suggested memory format.
struct DenseTensor {
  at::Tensor tensor;
  ChannelView view;
};

DenseTensor make_dense(const at::Tensor& input);

// `t` with exactly the strides of `dense` (copied only when they differ).
at::Tensor align_to(const at::Tensor& t, const DenseTensor& dense);

// Like at::empty_like(input, input.suggest_memory_format()), what torch's batch norm returns,
// but from result_allocator(): large results reuse freed memory (cpu/result_memory.h).
at::Tensor empty_result_like(const at::Tensor& input);

// A fresh result allocated as torch allocates it (in the input's suggested memory format),
// and the buffer the kernels write, strided like dense.tensor: the result itself unless the
// strides differ (a permuted or non-dense input), when finish() copies the buffer over.
struct ResultBuffer {
  at::Tensor result;
  at::Tensor buffer;

  ResultBuffer(const at::Tensor& input, const DenseTensor& dense)
      : result(empty_result_like(input)) {
    buffer = result.strides() == dense.tensor.strides() ? result : at::empty_like(dense.tensor);
  }
  at::Tensor finish() {
    if (!buffer.is_same(result)) result.copy_(buffer);
    return result;
  }
};

// The result of an elementwise pass over `input`: run(out) writes a tensor strided like
// dense.tensor.
template <typename Run>
at::Tensor elementwise_result(const at::Tensor& input, const DenseTensor& dense, const Run& run) {
  ResultBuffer out(input, dense);
  if (input.numel() > 0) run(out.buffer);
  return out.finish();
}

}  // namespace custom_bn::cpu
