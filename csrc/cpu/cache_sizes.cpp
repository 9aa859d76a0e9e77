// The cache sizes the plan's rules use (cache_sizes.h).
#include "cpu/cache_sizes.h"

#include "settings.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

namespace custom_bn::cpu {
namespace {

// The size of this CPU's cache at `level`, as Linux describes it in sysfs ("32768K"); 0 when
// it does not. glibc's sysconf is no substitute: on AMD it reports the L3 of the whole
// package, not the part the cores of this machine share (docs/perf.md).
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

// CUSTOM_BN_CACHE_BYTES_L2 / _L3, if set: the cache sizes to plan with, so that tests can
// reach the paths of layers larger than the cache with small tensors.
int64_t cache_bytes_setting(const char* name) {
  return count_setting(name, "a number of bytes", 1, 0);
}

}  // namespace

int64_t cache_bytes(int level) {
  static const auto measure = [](int level, const char* setting, int sysconf_name,
                                 int64_t fallback) {
    int64_t bytes = cache_bytes_setting(setting);
    if (bytes <= 0) bytes = sysfs_cache_bytes(level);
    if (bytes <= 0) bytes = sysconf(sysconf_name);
    return bytes > 0 ? bytes : fallback;
  };
  static const int64_t l2 =
      measure(2, "CUSTOM_BN_CACHE_BYTES_L2", _SC_LEVEL2_CACHE_SIZE, int64_t(1) << 20);
  static const int64_t l3 =
      measure(3, "CUSTOM_BN_CACHE_BYTES_L3", _SC_LEVEL3_CACHE_SIZE, int64_t(32) << 20);
  return level == 2 ? l2 : l3;
}

}  // namespace custom_bn::cpu
