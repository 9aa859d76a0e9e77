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

// The result tensor of an elementwise pass over `input`: torch's empty_like(input), which
// keeps the input's memory format. run(out_dense) writes a tensor strided like dense.tensor;
// when the two differ (inputs neither channels-first nor channels-last), it is copied over.
template <typename Run>
at::Tensor elementwise_result(const at::Tensor& input, const DenseTensor& dense, const Run& run) {
  at::Tensor result = at::empty_like(input);
  if (input.numel() == 0) return result;
  if (result.strides() == dense.tensor.strides()) {
    run(result);
  } else {
    at::Tensor out_dense = at::empty_like(dense.tensor);
    run(out_dense);
    result.copy_(out_dense);
  }
  return result;
}

}  // namespace custom_bn::cpu
