// Host-tier memory: large mmap'd arenas carved by a best-fit allocator.
//
// Host-tier memory never comes from the c10 CPU allocator: on a machine
// without a GPU the profiler's allocator events then count device-tier bytes
// alone (DESIGN.md, "The CPU stands in for the GPU"). Arenas are mapped
// anonymously, aligned to 2 MiB when large enough (transparent huge pages),
// and registered as pinned memory when a CUDA runtime is present and pinning
// is asked for.
//
// The budget bounds *reserved* bytes (what the arenas map), so it is a real
// bound on host memory: when an allocation fits no free block and a new
// arena would pass the budget, empty arenas are unmapped first; if it still
// does not fit, try_allocate() returns nullptr and the caller spills to SSD
// or raises. Every block's size is a multiple of `alignment` (>= 4096), so
// every block is aligned for O_DIRECT and can be read into whole.

#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "extent_allocator.h"
#include "host_common.h"

namespace lohan {
namespace host {

struct HostArenaOptions {
  uint64_t budget = UINT64_MAX;        // bound on reserved bytes
  uint64_t arena_bytes = 256ull << 20;  // size of an ordinary arena
  uint64_t alignment = 4096;           // block granule; a power of two >= 4096
  bool pin = false;                    // cudaHostRegister each arena
  bool hugepages = true;               // madvise(MADV_HUGEPAGE) on 2 MiB-aligned arenas
};

struct HostArenaStats {
  uint64_t in_use_bytes = 0;        // sum of live blocks (rounded to the granule)
  uint64_t requested_bytes = 0;     // sum of what callers asked for
  uint64_t peak_in_use_bytes = 0;
  uint64_t reserved_bytes = 0;      // mapped arenas
  uint64_t peak_reserved_bytes = 0;
  uint64_t free_bytes = 0;          // reserved - in_use
  uint64_t largest_free_bytes = 0;  // fragmentation = 1 - largest_free / free
  uint64_t free_blocks = 0;
  uint64_t live_blocks = 0;
  uint64_t arenas = 0;
  uint64_t pinned_bytes = 0;
  uint64_t allocs = 0;              // successful allocations, ever
  uint64_t frees = 0;
  uint64_t failed_allocs = 0;       // refused by the budget
  uint64_t budget_bytes = 0;        // UINT64_MAX when unlimited
  uint64_t alignment = 0;
};

class HostArena {
 public:
  explicit HostArena(HostArenaOptions opts);
  ~HostArena();
  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  // A block of at least nbytes (rounded up to the granule), or nullptr when
  // the budget would be exceeded. Throws Error(System) if the OS refuses.
  void* try_allocate(uint64_t nbytes);
  // Like try_allocate, but throws Error(Budget) with advice instead of nullptr.
  void* allocate(uint64_t nbytes);
  // Returns a block. Throws Error(Usage) for a pointer it did not hand out.
  void free(void* p);

  uint64_t block_size(const void* p) const;  // rounded size of a live block
  HostArenaStats stats() const;
  void reset_peak();
  void set_budget(uint64_t budget);
  // Unmaps every empty arena; returns the bytes released.
  uint64_t trim();
  // Throws std::logic_error if an internal invariant is broken.
  void check() const;
  const HostArenaOptions& options() const { return opts_; }

 private:
  struct Arena {
    char* base;
    uint64_t size;
    bool pinned;
  };
  struct Live {
    uint64_t region;
    uint64_t offset;
    uint64_t size;
    uint64_t requested;
  };

  bool map_arena(uint64_t size);  // false when the budget forbids it
  void unmap_arena(uint64_t id);
  uint64_t trim_locked();
  void* try_allocate_locked(uint64_t nbytes);

  HostArenaOptions opts_;
  mutable std::mutex m_;
  ExtentAllocator ext_;
  std::unordered_map<uint64_t, Arena> arenas_;
  std::unordered_map<uintptr_t, Live> live_;
  uint64_t next_arena_ = 0;
  uint64_t reserved_ = 0, peak_reserved_ = 0;
  uint64_t requested_ = 0, peak_in_use_ = 0;
  uint64_t pinned_ = 0;
  uint64_t allocs_ = 0, frees_ = 0, failed_ = 0;
};

}  // namespace host
}  // namespace lohan
