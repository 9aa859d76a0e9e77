#include "cpu/kernels.h"

namespace custom_bn::cpu {

const KernelTable& kernels() {
  static const KernelTable& table = [&]() -> const KernelTable& {
#if defined(CUSTOM_BN_HAVE_AVX2)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      return AVX2::kernel_table();
    }
#endif
    return DEFAULT::kernel_table();
  }();
  return table;
}

}  // namespace custom_bn::cpu
