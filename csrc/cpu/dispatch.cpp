#include "cpu/kernels.h"

namespace custom_bn::cpu {

const KernelTable& kernels() {
  static const KernelTable& table = [&]() -> const KernelTable& {
#if defined(CUSTOM_BN_HAVE_X86_KERNELS)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      return AVX512::kernel_table();
    }
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
