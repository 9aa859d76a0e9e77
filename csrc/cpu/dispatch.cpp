// Picks the CPU kernel variant once per process: the widest instruction set the CPU supports,
// or a narrower one named by CUSTOM_BN_CPU_CAPABILITY=default|avx2|avx512 (as
// ATEN_CPU_CAPABILITY does for ATen), so that tests can run every variant on one machine.
// Also what every variant plans with: the cache sizes, and when a pass goes a channel at a time.
#include "cpu/kernels.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

namespace custom_bn::cpu {
namespace {

struct Variant {
  const char* name;
  const KernelTable& (*table)();
};

Variant select_variant() {
  const char* requested = std::getenv("CUSTOM_BN_CPU_CAPABILITY");
  const std::string cap = requested != nullptr ? requested : "";
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

namespace {

// The size of this CPU's cache at `level`, as Linux describes it in sysfs ("32768K"); 0 when
// it does not. glibc's sysconf is no substitute: on AMD it reports the L3 of the whole
// package (384 MB on a 2-core VM whose cores share 32 MB).
int64_t sysfs_cache_bytes(int level) {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    std::ifstream level_file(dir + "/level"), type_file(dir + "/type"), size_file(dir + "/size");
    int found_level = 0;
    std::string type, size;
    if (!(level_file >> found_level) || !(type_file >> type) || !(size_file >> size)) break;
    if (found_level != level || type == "Instruction") continue;
    char* unit = nullptr;
    const long long value = std::strtoll(size.c_str(), &unit, 10);
    const int64_t scale = *unit == 'K' ? 1 << 10 : *unit == 'M' ? 1 << 20 : 1;
    return value > 0 ? value * scale : 0;
  }
  return 0;
}

}  // namespace

int64_t cache_bytes(int level) {
  static const auto measure = [](int level, int sysconf_name, int64_t fallback) {
    int64_t bytes = sysfs_cache_bytes(level);
    if (bytes <= 0) bytes = sysconf(sysconf_name);
    return bytes > 0 ? bytes : fallback;
  };
  static const int64_t l2 = measure(2, _SC_LEVEL2_CACHE_SIZE, int64_t(1) << 20);
  static const int64_t l3 = measure(3, _SC_LEVEL3_CACHE_SIZE, int64_t(32) << 20);
  return level == 2 ? l2 : l3;
}

bool fits_by_channel(const ChannelView& view, int inputs, int64_t element_size) {
  const int64_t channel_bytes = inputs * view.outer * view.inner * element_size;
  return view.layout == Layout::kChannelsFirst && channel_bytes > 0 &&
         channel_bytes <= cache_bytes(2) && channel_bytes * view.channels > cache_bytes(3);
}

}  // namespace custom_bn::cpu

// For diagnostics and tests (ctypes): the variant this process runs.
extern "C" __attribute__((visibility("default"))) const char* custom_bn_cpu_capability() {
  return custom_bn::cpu::kernel_capability();
}

// The cache sizes the kernels plan with, for tests that size inputs around them (ctypes).
extern "C" __attribute__((visibility("default"))) int64_t custom_bn_cache_bytes(int level) {
  return custom_bn::cpu::cache_bytes(level);
}

// Whether a channels-first (outer, channels, inner) pass reading `inputs` tensors goes a
// channel at a time, for the tests and the benchmark's byte counts (ctypes).
extern "C" __attribute__((visibility("default"))) bool custom_bn_fits_by_channel(
    int64_t outer, int64_t channels, int64_t inner, int inputs, int64_t element_size) {
  using custom_bn::cpu::ChannelView;
  using custom_bn::cpu::Layout;
  return custom_bn::cpu::fits_by_channel(
      ChannelView{Layout::kChannelsFirst, outer, channels, inner}, inputs, element_size);
}
