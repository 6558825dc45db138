// Best-fit allocation of extents inside regions, with coalescing.
//
// One algorithm serves both tiers: the host arena (a region is an mmap'd
// arena, offsets are bytes from its base) and the SSD tier (a region is a
// data file, which can grow at its end). Every size and offset is a multiple
// of the granule the caller rounds to; the allocator itself only keeps the
// books. Not thread-safe: the owner holds its own lock.
//
// Invariants, checked by check():
//   - each region is tiled exactly by its blocks (no gap, no overlap);
//   - no two free blocks are adjacent in one region (coalesced);
//   - the free index holds exactly the free blocks;
//   - free_bytes() and largest_free() agree with the blocks.

#pragma once

#include <cstdint>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

namespace lohan {
namespace host {

class ExtentAllocator {
 public:
  struct Extent {
    uint64_t region;
    uint64_t offset;
    uint64_t size;
  };

  void add_region(uint64_t region, uint64_t size) {
    if (regions_.count(region)) throw std::logic_error("ExtentAllocator: region exists");
    regions_[region] = size;
    if (size > 0) insert_free(region, 0, size);
  }

  // Appends `extra` free bytes at the end of a region, merged with a free tail.
  void grow_region(uint64_t region, uint64_t extra) {
    auto r = regions_.find(region);
    if (r == regions_.end()) throw std::logic_error("ExtentAllocator: no such region");
    uint64_t end = r->second;
    r->second += extra;
    if (extra == 0) return;
    if (end > 0) {
      auto last = std::prev(blocks_.lower_bound({region, end}));
      if (last->first.first == region && last->second.free) {
        uint64_t off = last->first.second, size = last->second.size;
        erase_free(region, off, size);
        insert_free(region, off, size + extra);
        return;
      }
    }
    insert_free(region, end, extra);
  }

  // Removes a region that holds no allocated block.
  void remove_region(uint64_t region) {
    auto r = regions_.find(region);
    if (r == regions_.end()) throw std::logic_error("ExtentAllocator: no such region");
    if (!region_empty(region)) throw std::logic_error("ExtentAllocator: region in use");
    if (r->second > 0) erase_free(region, 0, r->second);
    regions_.erase(r);
  }

  bool region_empty(uint64_t region) const {
    auto r = regions_.find(region);
    if (r == regions_.end()) return false;
    if (r->second == 0) return true;
    auto b = blocks_.find({region, 0});
    return b != blocks_.end() && b->second.free && b->second.size == r->second;
  }

  uint64_t region_size(uint64_t region) const { return regions_.at(region); }
  const std::map<uint64_t, uint64_t>& regions() const { return regions_; }

  // Smallest free block that fits (ties: lowest region, then offset); split.
  std::optional<Extent> allocate(uint64_t size) {
    auto it = free_.lower_bound({size, 0, 0});
    if (it == free_.end()) return std::nullopt;
    return take(it, size);
  }

  // Best fit inside one region (the smallest free block there that holds size).
  std::optional<Extent> allocate_in(uint64_t region, uint64_t size) {
    for (auto it = free_.lower_bound({size, 0, 0}); it != free_.end(); ++it)
      if (std::get<1>(*it) == region) return take(it, size);
    return std::nullopt;
  }

  // Returns the block at (region, offset); returns its size. Coalesces.
  uint64_t release(uint64_t region, uint64_t offset) {
    auto it = blocks_.find({region, offset});
    if (it == blocks_.end() || it->second.free)
      throw std::logic_error("ExtentAllocator: release of an extent that is not allocated");
    uint64_t size = it->second.size;
    uint64_t start = offset, total = size;
    // merge with the following free block
    auto next = std::next(it);
    if (next != blocks_.end() && next->first.first == region && next->second.free) {
      total += next->second.size;
      erase_free(region, next->first.second, next->second.size);
    }
    // merge with the preceding free block
    if (it != blocks_.begin()) {
      auto prev = std::prev(it);
      if (prev->first.first == region && prev->second.free) {
        start = prev->first.second;
        total += prev->second.size;
        erase_free(region, start, prev->second.size);
      }
    }
    blocks_.erase({region, offset});
    used_ -= size;
    insert_free(region, start, total);
    return size;
  }

  uint64_t used_bytes() const { return used_; }
  uint64_t free_bytes() const { return free_bytes_; }
  uint64_t largest_free() const {
    return free_.empty() ? 0 : std::get<0>(*free_.rbegin());
  }
  uint64_t free_blocks() const { return free_.size(); }
  // The free tail of a region (0 if its last block is allocated).
  uint64_t free_tail(uint64_t region) const {
    uint64_t end = regions_.at(region);
    if (end == 0) return 0;
    auto last = std::prev(blocks_.lower_bound({region, end}));
    return last->second.free ? last->second.size : 0;
  }

  void check() const {
    uint64_t free_sum = 0, used_sum = 0;
    size_t n_free = 0;
    for (const auto& [region, size] : regions_) {
      uint64_t pos = 0;
      bool prev_free = false;
      for (auto it = blocks_.lower_bound({region, 0});
           it != blocks_.end() && it->first.first == region; ++it) {
        if (it->first.second != pos) fail("blocks do not tile their region (gap or overlap)");
        if (it->second.size == 0) fail("zero-sized block");
        if (it->second.free) {
          if (prev_free) fail("two adjacent free blocks were not coalesced");
          if (!free_.count({it->second.size, region, pos})) fail("free block missing from the index");
          free_sum += it->second.size;
          ++n_free;
        } else {
          used_sum += it->second.size;
        }
        prev_free = it->second.free;
        pos += it->second.size;
      }
      if (pos != size) fail("blocks do not cover their region");
    }
    size_t n_blocks = 0;
    for (const auto& [region, size] : regions_) {
      (void)size;
      for (auto it = blocks_.lower_bound({region, 0});
           it != blocks_.end() && it->first.first == region; ++it)
        ++n_blocks;
    }
    if (n_blocks != blocks_.size()) fail("a block lies outside every region");
    if (n_free != free_.size()) fail("the free index holds blocks that are not free");
    if (free_sum != free_bytes_) fail("free byte count is wrong");
    if (used_sum != used_) fail("used byte count is wrong");
  }

 private:
  struct Node {
    uint64_t size;
    bool free;
  };

  [[noreturn]] static void fail(const char* what) {
    throw std::logic_error(std::string("ExtentAllocator invariant broken: ") + what);
  }

  Extent take(std::set<std::tuple<uint64_t, uint64_t, uint64_t>>::iterator it, uint64_t size) {
    auto [bsize, region, off] = *it;
    free_.erase(it);
    free_bytes_ -= bsize;
    blocks_[{region, off}] = Node{size, false};
    if (bsize > size) insert_free(region, off + size, bsize - size);
    used_ += size;
    return Extent{region, off, size};
  }

  void insert_free(uint64_t region, uint64_t off, uint64_t size) {
    blocks_[{region, off}] = Node{size, true};
    free_.insert({size, region, off});
    free_bytes_ += size;
  }

  void erase_free(uint64_t region, uint64_t off, uint64_t size) {
    free_.erase({size, region, off});
    blocks_.erase({region, off});
    free_bytes_ -= size;
  }

  std::map<uint64_t, uint64_t> regions_;                        // region -> size
  std::map<std::pair<uint64_t, uint64_t>, Node> blocks_;        // (region, offset) -> block
  std::set<std::tuple<uint64_t, uint64_t, uint64_t>> free_;     // (size, region, offset)
  uint64_t used_ = 0;
  uint64_t free_bytes_ = 0;
};

}  // namespace host
}  // namespace lohan
