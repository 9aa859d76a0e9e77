// Dense views of tensors for the kernels (layout.h).
#include "layout.h"

#include <c10/util/Exception.h>

#include <numeric>
#include <optional>
#include <vector>

namespace custom_bn {
namespace {

std::optional<ChannelView> channel_view_of(const at::Tensor& t) {
  const int64_t N = t.size(0), C = t.size(1);
  int64_t S = 1;
  for (int64_t d = 2; d < t.dim(); ++d) S *= t.size(d);
  std::vector<int64_t> channels_last_order(t.dim());
  std::iota(channels_last_order.begin() + 1, channels_last_order.end() - 1, 2);
  channels_last_order.back() = 1;
  const bool channels_last = t.permute(channels_last_order).is_contiguous();
  // With one value per (n, c), both layouts describe the same memory: walk rows of C.
  if (channels_last && (S == 1 || !t.is_contiguous())) {
    return ChannelView{Layout::kChannelsLast, N * S, C, 1};
  }
  if (t.is_contiguous()) return ChannelView{Layout::kChannelsFirst, N, C, S};
  return std::nullopt;
}

}  // namespace

DenseTensor make_dense(const at::Tensor& input) {
  if (std::optional<ChannelView> view = channel_view_of(input)) return {input, *view};
  at::Tensor dense = input.contiguous(input.suggest_memory_format());
  std::optional<ChannelView> view = channel_view_of(dense);
  TORCH_INTERNAL_ASSERT(view.has_value(), "a contiguous copy must be walkable");
  return {dense, *view};
}

at::Tensor align_to(const at::Tensor& t, const DenseTensor& dense) {
  if (t.strides() == dense.tensor.strides()) return t;
  return at::empty_like(dense.tensor).copy_(t);
}

}  // namespace custom_bn
