#include "cpu/layout.h"

#include <ATen/ops/empty_like.h>

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

namespace custom_bn::cpu {
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

void advise_huge_pages(const at::Tensor& fresh) {
#if defined(MADV_HUGEPAGE)
  // CUSTOM_BN_HUGE_PAGES=0 turns the advice off: huge-page faults trade a lower median for
  // rare slow calls on some machines (docs/perf.md).
  static const bool enabled = [] {
    const char* setting = std::getenv("CUSTOM_BN_HUGE_PAGES");
    return setting == nullptr || std::string(setting) != "0";
  }();
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (!enabled || fresh.nbytes() < 4 * kHugePage) return;
  const auto begin = reinterpret_cast<uintptr_t>(fresh.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + fresh.nbytes()) & ~(kHugePage - 1);
  // Advice only: failure (huge pages off, say) changes nothing but speed.
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

at::Tensor align_to(const at::Tensor& t, const DenseTensor& dense) {
  if (t.strides() == dense.tensor.strides()) return t;
  return at::empty_like(dense.tensor).copy_(t);
}

}  // namespace custom_bn::cpu
