// Optional tensor arguments, the one way: an argument is present when it holds a defined
// tensor (callers may pass std::nullopt or an undefined tensor alike).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace custom_bn {

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A tensor member (undefined when the module lacks it) as an optional argument.
inline std::optional<at::Tensor> if_defined(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace custom_bn
