// Putting tensors into a layout the kernels walk (ChannelView), and writing results back in
// the memory format torch's batch norm returns. Host code, shared by the CPU and CUDA backends.
#pragma once

#include "channel_view.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <optional>

namespace custom_bn {

// A tensor the kernels can walk, and how. `tensor` is the input itself when it is
// channels-first or channels-last dense, else a copy in its suggested memory format.
struct DenseTensor {
  at::Tensor tensor;
  ChannelView view;
};

DenseTensor make_dense(const at::Tensor& input);

// How the kernels walk `t` where it is channels-first or channels-last dense; else none.
std::optional<ChannelView> channel_view_of(const at::Tensor& t);

// Whether two tensors of the same sizes map their elements to the same offsets: equal strides
// in every dimension longer than 1 (a size-1 dimension's stride is never used).
bool same_offsets(const at::Tensor& a, const at::Tensor& b);

// `t` with the element offsets of `dense` (copied only when they differ).
at::Tensor align_to(const at::Tensor& t, const DenseTensor& dense);

// Which result a memory format is chosen for: torch's CPU batch norm picks the output's and the
// input gradient's by different rules.
enum class ResultKind { kOutput, kGradient };

// The memory format of a fresh result, as torch's CPU batch norm gives it. An output is in the
// input's own format when the input is dense in one (contiguous first, then channels_last and
// channels_last_3d, so size-1 dimensions may have any stride), else in the suggested one; a
// gradient is in the suggested format. An empty input's results keep its strides
// (c10::MemoryFormat::Preserve: torch returns a clone there).
c10::MemoryFormat result_memory_format(const at::Tensor& input, ResultKind kind);

// A fresh result in result_memory_format(input, kind).
at::Tensor empty_result_like(const at::Tensor& input, ResultKind kind);

// A fresh result in the input's suggested memory format (as torch allocates it), and the
// buffer the kernels write, strided like dense.tensor: the result itself unless the strides
// differ (a permuted or non-dense input), when finish() copies the buffer over.
struct ResultBuffer {
  at::Tensor result;
  at::Tensor buffer;

  ResultBuffer(at::Tensor fresh_result, const DenseTensor& dense)
      : result(std::move(fresh_result)) {
    buffer = same_offsets(result, dense.tensor) ? result : at::empty_like(dense.tensor);
  }
  at::Tensor finish() {
    if (!buffer.is_same(result)) result.copy_(buffer);
    return result;
  }
};

// The result of an elementwise pass: run(buffer) writes a tensor strided like dense.tensor,
// and the pass is skipped for an empty input.
template <typename Run>
at::Tensor elementwise_result(at::Tensor fresh_result, const DenseTensor& dense, const Run& run) {
  ResultBuffer out(std::move(fresh_result), dense);
  if (dense.tensor.numel() > 0) run(out.buffer);
  return out.finish();
}

}  // namespace custom_bn
