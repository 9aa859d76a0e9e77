// Dense views of tensors for the kernels (layout.h).
#include "layout.h"

#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

#include <optional>

namespace custom_bn {
namespace {

// Whether t is contiguous with its channel dimension innermost (N, spatial..., C), by the rule
// of Tensor::is_contiguous (a dimension of size 1 may have any stride), read from the strides
// rather than from a permuted view: that costs a dispatcher call per tensor and call.
bool is_channels_last_dense(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  int64_t expected_stride = 1;
  const auto dense_at = [&](int64_t d) {
    if (t.size(d) == 1) return true;
    if (t.stride(d) != expected_stride) return false;
    expected_stride *= t.size(d);
    return true;
  };
  if (!dense_at(1)) return false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (!dense_at(d)) return false;
  }
  return dense_at(0);
}

}  // namespace

std::optional<ChannelView> channel_view_of(const at::Tensor& t) {
  const int64_t N = t.size(0), C = t.size(1);
  int64_t S = 1;
  for (int64_t d = 2; d < t.dim(); ++d) S *= t.size(d);
  const bool channels_last = is_channels_last_dense(t);
  // With one value per (n, c), both layouts describe the same memory: walk rows of C.
  if (channels_last && (S == 1 || !t.is_contiguous())) {
    return ChannelView{Layout::kChannelsLast, N * S, C, 1};
  }
  if (t.is_contiguous()) return ChannelView{Layout::kChannelsFirst, N, C, S};
  return std::nullopt;
}

DenseTensor make_dense(const at::Tensor& input) {
  if (std::optional<ChannelView> view = channel_view_of(input)) return {input, *view};
  at::Tensor dense = input.contiguous(input.suggest_memory_format());
  std::optional<ChannelView> view = channel_view_of(dense);
  TORCH_INTERNAL_ASSERT(view.has_value(), "a contiguous copy must be walkable");
  return {dense, *view};
}

c10::MemoryFormat result_memory_format(const at::Tensor& input, ResultKind kind) {
  if (input.sym_numel() == 0) return c10::MemoryFormat::Preserve;
  if (kind == ResultKind::kOutput) {
    for (const c10::MemoryFormat format :
         {c10::MemoryFormat::Contiguous, c10::MemoryFormat::ChannelsLast,
          c10::MemoryFormat::ChannelsLast3d}) {
      if (input.is_contiguous(format)) return format;
    }
  }
  return input.suggest_memory_format();
}

at::Tensor empty_result_like(const at::Tensor& input, ResultKind kind) {
  const c10::MemoryFormat format = result_memory_format(input, kind);
  // The input's exact strides: empty_like's Preserve may not keep them for an empty tensor.
  if (format == c10::MemoryFormat::Preserve) {
    return at::empty_strided_symint(input.sym_sizes(), input.sym_strides(), input.options());
  }
  return at::empty_like(input, format);
}

bool same_offsets(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

at::Tensor align_to(const at::Tensor& t, const DenseTensor& dense) {
  if (same_offsets(t, dense.tensor)) return t;
  return at::empty_like(dense.tensor).copy_(t);
}

}  // namespace custom_bn
