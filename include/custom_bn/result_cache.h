// The result cache, the memory custom_bn holds for reuse: large CPU results (outputs and input
// gradients) that were freed are kept, up to CUSTOM_BN_RESULT_CACHE_MB (default 1024; 0 turns the
// cache off), and handed to the next result of a similar size, so that a training loop's results do
// not fault in fresh pages every step. As torch.cuda.memory_reserved and empty_cache for CUDA.
#pragma once

#include <cstddef>

namespace custom_bn::result_cache {

// Bytes of freed results held for reuse.
size_t cached_bytes();

// Returns every cached block to the operating system. Results still alive are unaffected.
void empty_cache();

}  // namespace custom_bn::result_cache
