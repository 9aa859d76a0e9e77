// The emulator's model of global memory between the blocks of one launch (used by
// simt_runtime.cpp; kernels reach it through simt::load / store / thread_fence / atomic_add).
//
// Visibility: a store waits in its block's buffer (the block itself reads it from there) until
// the storing thread fences, or the kernel ends; until then other blocks read what memory held.
//
// Ordering, with a vector clock per block: a block's fences count its releases (`published`).
// An atomic on an address joins the block's clock into the address's, and the address's clock
// into what the block acquires at its next fence. A location written by block W at W's
// release s may be read, or written again, by block R only once R's clock holds s for W:
// W stored, fenced, reached the atomic that R later reached, and R fenced after that atomic.
// Anything else is reported: a read of a store not yet fenced, a read (or a second write)
// without that chain, which on a GPU may see a stale or partial value.
#pragma once

#include "simt_runtime.h"

#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

namespace custom_bn::simt::detail {

class GlobalMemory {
 public:
  explicit GlobalMemory(Dim grid) : grid_(grid) {}

  void load(int block, const void* address, void* value, size_t bytes);
  void store(int block, int thread, void* address, const void* value, size_t bytes);
  void fence(int block, int thread);
  void atomic(int block, const void* address);
  void finish_block(int block);
  // The kernel's end: every buffered store reaches memory.
  void finish_kernel();
  const std::vector<std::string>& violations() const { return violations_; }

 private:
  using Clock = std::map<int, uint64_t>;  // block -> its releases known; sparse
  static constexpr uint64_t kUnfenced = UINT64_MAX;

  struct Buffered {
    int thread;
    size_t bytes;
    unsigned char value[16];
  };
  struct BlockState {
    std::unordered_map<uintptr_t, Buffered> stores;
    Clock clock;     // clock[own id] = this block's releases (fences)
    Clock acquired;  // from atomics, joined into clock at the next fence
  };
  struct Written {
    int block;
    uint64_t release;  // the writer's release that published it; kUnfenced until its fence
  };

  BlockState& state(int block) { return blocks_[block]; }
  std::string name(int block) const;
  // Whether `block` is ordered after `w`'s write (always, for its own writes).
  bool ordered_after(int block, const Written& w);
  void report(std::string message);

  Dim grid_;
  std::unordered_map<int, BlockState> blocks_;  // the resident (and finished, unflushed) blocks
  std::unordered_map<uintptr_t, Written> written_;
  std::unordered_map<uintptr_t, Clock> atomic_clocks_;
  std::vector<std::string> violations_;
};

}  // namespace custom_bn::simt::detail
