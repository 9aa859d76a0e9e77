// Picks the CPU kernel variant once per process: the widest instruction set the CPU supports,
// or a narrower one named by CUSTOM_BN_CPU_CAPABILITY=default|avx2|avx512 (as
// ATEN_CPU_CAPABILITY does for ATen), so that tests can run every variant on one machine.
#include "cpu/kernels.h"
#include "settings.h"

#include <string>

namespace custom_bn::cpu {
namespace {

struct Variant {
  const char* name;
  const KernelTable& (*table)();
};

Variant select_variant() {
  const std::string cap =
      choice_setting("CUSTOM_BN_CPU_CAPABILITY", {"default", "avx2", "avx512"}, "");
#if defined(CUSTOM_BN_HAVE_X86_KERNELS)
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (avx512 && (cap.empty() || cap == "avx512")) return {"avx512", AVX512::kernel_table};
  if (avx2 && (cap.empty() || cap == "avx512" || cap == "avx2")) {
    return {"avx2", AVX2::kernel_table};
  }
#endif
  return {"default", DEFAULT::kernel_table};
}

const Variant& variant() {
  static const Variant selected = select_variant();
  return selected;
}

}  // namespace

const KernelTable& kernels() {
  static const KernelTable& table = variant().table();
  return table;
}

const char* kernel_capability() { return variant().name; }

}  // namespace custom_bn::cpu
