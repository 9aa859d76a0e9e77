#include "simt_memory.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace custom_bn::simt::detail {
namespace {

constexpr size_t kMaxReports = 8;  // the first few say enough

void join(std::map<int, uint64_t>& into, const std::map<int, uint64_t>& from) {
  for (const auto& [block, release] : from) {
    uint64_t& known = into[block];
    known = std::max(known, release);
  }
}

}  // namespace

std::string GlobalMemory::name(int block) const {
  return "block (" + std::to_string(block % grid_.x) + "," + std::to_string(block / grid_.x) + ")";
}

void GlobalMemory::report(std::string message) {
  if (violations_.size() < kMaxReports) violations_.push_back(std::move(message));
}

bool GlobalMemory::ordered_after(int block, const Written& w) {
  if (w.block == block) return true;
  if (w.release == kUnfenced) return false;
  const Clock& clock = state(block).clock;
  const auto known = clock.find(w.block);
  return known != clock.end() && known->second >= w.release;
}

void GlobalMemory::load(int block, const void* address, void* value, size_t bytes) {
  const auto key = reinterpret_cast<uintptr_t>(address);
  BlockState& self = state(block);
  if (const auto own = self.stores.find(key);
      own != self.stores.end() && own->second.bytes == bytes) {
    std::memcpy(value, own->second.value, bytes);
    return;
  }
  if (const auto w = written_.find(key); w != written_.end() && !ordered_after(block, w->second)) {
    report(name(block) + " read global memory that " + name(w->second.block) +
           (w->second.release == kUnfenced
                ? " stored and has not fenced (no __threadfence() after the store)"
                : " stored, without synchronizing with that block first (no atomic it "
                  "released through, or no __threadfence() after that atomic)"));
  }
  std::memcpy(value, address, bytes);  // another block's buffered store is not seen
}

void GlobalMemory::store(int block, int thread, void* address, const void* value, size_t bytes) {
  if (bytes > sizeof(Buffered::value)) throw std::invalid_argument("simt::store: value too large");
  const auto key = reinterpret_cast<uintptr_t>(address);
  if (const auto w = written_.find(key); w != written_.end() && !ordered_after(block, w->second)) {
    report(name(block) + " and " + name(w->second.block) +
           " both wrote one global location in one kernel, unordered");
  }
  written_[key] = {block, kUnfenced};
  Buffered& entry = state(block).stores[key];
  entry.thread = thread;
  entry.bytes = bytes;
  std::memcpy(entry.value, value, bytes);
}

void GlobalMemory::fence(int block, int thread) {
  BlockState& self = state(block);
  const uint64_t release = ++self.clock[block];
  for (auto it = self.stores.begin(); it != self.stores.end();) {
    if (it->second.thread != thread) {
      ++it;
      continue;
    }
    std::memcpy(reinterpret_cast<void*>(it->first), it->second.value, it->second.bytes);
    written_[it->first].release = release;
    it = self.stores.erase(it);
  }
  join(self.clock, self.acquired);
  self.acquired.clear();
}

void GlobalMemory::atomic(int block, const void* address) {
  BlockState& self = state(block);
  Clock& at_address = atomic_clocks_[reinterpret_cast<uintptr_t>(address)];
  join(at_address, self.clock);
  join(self.acquired, at_address);
}

void GlobalMemory::finish_block(int block) {
  // Its stores stay buffered until the kernel ends; its clock is no longer needed.
  BlockState& self = state(block);
  self.clock.clear();
  self.acquired.clear();
}

void GlobalMemory::finish_kernel() {
  for (auto& [block, self] : blocks_) {
    for (const auto& [address, entry] : self.stores) {
      std::memcpy(reinterpret_cast<void*>(address), entry.value, entry.bytes);
    }
  }
  blocks_.clear();
  written_.clear();
  atomic_clocks_.clear();
}

}  // namespace custom_bn::simt::detail
