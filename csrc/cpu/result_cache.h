// Memory for the large CPU results (outputs and input gradients).
//
// From torch's CPU allocator, a result of tens of MB is often a fresh mapping: glibc maps
// blocks above its mmap threshold fresh and unmaps them when freed, and returns the top of
// its heap to the kernel. The kernel then faults and zeroes the result page by page when the
// op first writes it, which costs more than the batch norm itself (docs/perf.md). A training
// or inference loop frees a result of the same size every step, so the allocator below keeps
// a few freed blocks and hands them out again: mapped pages, no faults, no zeroing. It maps
// its blocks itself, 2 MB-aligned, and advises the kernel to back them with 2 MB pages.
//
// Which results it serves is the plan's decision (csrc/cpu/plan.h, via serves()); whatever
// it is asked for, it serves.
#pragma once

#include <c10/core/Allocator.h>

#include <cstddef>
#include <mutex>
#include <vector>

namespace custom_bn::cpu {

class ResultCache final : public c10::Allocator {
 public:
  // Results of at least this many bytes are worth caching; glibc reuses smaller blocks well
  // on its own.
  static constexpr size_t kMinCachedBytes = size_t(8) << 20;

  // Keeps at most cache_limit bytes of freed blocks (0: none); huge_pages: advise 2 MB pages.
  ResultCache(size_t cache_limit, bool huge_pages);

  // Whether a result of `bytes` should come from here: caching is on and the result large.
  bool serves(size_t bytes) const { return cache_limit_ > 0 && bytes >= kMinCachedBytes; }

  c10::DataPtr allocate(size_t n) override;
  void copy_data(void* dest, const void* src, std::size_t count) const override;

  // Freed blocks held for reuse, in bytes.
  size_t cached_bytes() const;
  // Unmaps every cached block.
  void release_cached();

  // pthread_atfork handlers: hold the lock across fork, release it on both sides.
  void before_fork();
  void after_fork();

 private:
  struct Block {
    void* data;
    size_t capacity;
    ResultCache* owner;
  };
  static void give_back(void* block);
  void cache_or_free(Block* block);
  Block* map_block(size_t capacity) const;
  static void unmap_block(Block* block);

  const size_t cache_limit_;
  const bool huge_pages_;
  mutable std::mutex mutex_;
  std::vector<Block*> cached_;  // oldest first
  size_t cached_bytes_ = 0;
};

// The allocator large CPU results use. CUSTOM_BN_RESULT_CACHE_MB sets its cache (default 1024;
// 0 turns caching off, and every result comes from torch's CPU allocator),
// CUSTOM_BN_HUGE_PAGES=0 its huge-page advice. Never destroyed: results may outlive static
// destruction.
ResultCache& result_cache();

}  // namespace custom_bn::cpu
