// The sizes of this CPU's caches, as the plan's rules (plan.h) size their work by them.
#pragma once

#include <cstdint>

namespace custom_bn::cpu {

// Bytes of the level-2 (per core) or level-3 cache: CUSTOM_BN_CACHE_BYTES_L2 / _L3 where set,
// else sysfs, else sysconf, else 1 MB and 32 MB.
int64_t cache_bytes(int level);

}  // namespace custom_bn::cpu
