// How the kernels of every backend see a dense tensor: (outer, C, inner), row-major.
// Plain data, so that host code, CUDA device code and the SIMT emulator share it.
#pragma once

#include <cstdint>

namespace custom_bn {

//   kChannelsFirst: (outer = N, C, inner = S), S = the product of the spatial sizes;
//   kChannelsLast:  (outer = N * S, C), inner = 1.
enum class Layout { kChannelsFirst, kChannelsLast };

struct ChannelView {
  Layout layout;
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

}  // namespace custom_bn
