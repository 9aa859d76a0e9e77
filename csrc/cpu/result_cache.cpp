// The allocator of large CPU results (result_cache.h) and the public memory API
// (include/custom_bn/result_cache.h) over it.
#include "cpu/result_cache.h"
#include "settings.h"

#include <custom_bn/result_cache.h>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace custom_bn::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

size_t round_up(size_t n, size_t multiple) { return (n + multiple - 1) / multiple * multiple; }

}  // namespace

ResultCache::ResultCache(size_t cache_limit, bool huge_pages)
    : cache_limit_(cache_limit), huge_pages_(huge_pages) {}

void ResultCache::before_fork() { mutex_.lock(); }
void ResultCache::after_fork() { mutex_.unlock(); }

c10::DataPtr ResultCache::allocate(size_t n) {
  const size_t capacity = round_up(std::max<size_t>(n, 1), kHugePage);
  {
    // The smallest cached block that fits, if it wastes at most a quarter of itself; of equal
    // ones the last freed, whose pages are the likeliest to be in cache.
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = cached_.end();
    for (auto it = cached_.begin(); it != cached_.end(); ++it) {
      const size_t have = (*it)->capacity;
      if (have >= capacity && have <= capacity + capacity / 4 &&
          (best == cached_.end() || have <= (*best)->capacity)) {
        best = it;
      }
    }
    if (best != cached_.end()) {
      Block* block = *best;
      cached_.erase(best);
      cached_bytes_ -= block->capacity;
      return {block->data, block, &ResultCache::give_back, c10::Device(c10::kCPU)};
    }
  }
  Block* block = map_block(capacity);
  if (block == nullptr) {
    release_cached();
    block = map_block(capacity);
  }
  TORCH_CHECK_WITH(OutOfMemoryError, block != nullptr, "custom_bn: could not allocate ", capacity,
                   " bytes for a result");
  return {block->data, block, &ResultCache::give_back, c10::Device(c10::kCPU)};
}

// A fresh mapping of `capacity` bytes (a multiple of 2 MB) aligned to 2 MB: mapped 2 MB
// larger, then trimmed at both ends. Null when the kernel refuses.
ResultCache::Block* ResultCache::map_block(size_t capacity) const {
  const size_t mapped = capacity + kHugePage;
  void* start = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (start == MAP_FAILED) return nullptr;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(start);
  const uintptr_t aligned = (begin + kHugePage - 1) / kHugePage * kHugePage;
  if (aligned > begin) munmap(start, aligned - begin);
  const size_t tail = begin + mapped - (aligned + capacity);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + capacity), tail);
  void* data = reinterpret_cast<void*>(aligned);
#if defined(MADV_HUGEPAGE)
  // Advice only: where huge pages are off it changes nothing.
  if (huge_pages_) (void)madvise(data, capacity, MADV_HUGEPAGE);
#endif
  return new Block{data, capacity, const_cast<ResultCache*>(this)};
}

void ResultCache::unmap_block(Block* block) {
  munmap(block->data, block->capacity);
  delete block;
}

void ResultCache::copy_data(void* dest, const void* src, std::size_t count) const {
  std::memcpy(dest, src, count);
}

size_t ResultCache::cached_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return cached_bytes_;
}

void ResultCache::release_cached() {
  std::vector<Block*> released;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    released.swap(cached_);
    cached_bytes_ = 0;
  }
  for (Block* block : released) unmap_block(block);
}

void ResultCache::give_back(void* block) {
  auto* b = static_cast<Block*>(block);
  b->owner->cache_or_free(b);
}

// The freed block joins the cache; the oldest blocks leave it while it holds more than the
// limit (so a block larger than the limit is freed at once).
void ResultCache::cache_or_free(Block* block) {
  std::vector<Block*> evicted;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    cached_.push_back(block);
    cached_bytes_ += block->capacity;
    auto keep = cached_.begin();
    while (cached_bytes_ > cache_limit_) {
      cached_bytes_ -= (*keep)->capacity;
      evicted.push_back(*keep++);
    }
    cached_.erase(cached_.begin(), keep);
  }
  for (Block* b : evicted) unmap_block(b);
}

ResultCache& result_cache() {
  static ResultCache* const allocator = [] {
    const int64_t megabytes =
        count_setting("CUSTOM_BN_RESULT_CACHE_MB", "a number of megabytes", 0, 1024);
    auto* created = new ResultCache(static_cast<size_t>(megabytes) << 20,
                                    flag_setting("CUSTOM_BN_HUGE_PAGES", true));
    // A process that forks (a DataLoader worker) while another thread holds the cache's lock
    // would leave the child a lock nobody releases: fork waits for the lock, and both sides
    // release it after.
    pthread_atfork([] { result_cache().before_fork(); }, [] { result_cache().after_fork(); },
                   [] { result_cache().after_fork(); });
    return created;
  }();
  return *allocator;
}

}  // namespace custom_bn::cpu

namespace custom_bn::result_cache {

size_t cached_bytes() { return cpu::result_cache().cached_bytes(); }

void empty_cache() { cpu::result_cache().release_cached(); }

namespace {

int64_t cached_bytes_op() { return static_cast<int64_t>(cached_bytes()); }

}  // namespace

// No tensor arguments, so no backend key: one kernel for every caller.
TORCH_LIBRARY_IMPL(custom_bn, CompositeImplicitAutograd, m) {
  m.impl("_result_cache_bytes", TORCH_FN(cached_bytes_op));
  m.impl("_empty_result_cache", TORCH_FN(empty_cache));
}

}  // namespace custom_bn::result_cache
