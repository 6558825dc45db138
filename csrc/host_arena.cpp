#include "host_arena.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <stdexcept>
#include <vector>

#include "cuda_pin.h"

namespace lohan {
namespace host {
namespace {

bool is_pow2(uint64_t x) { return x && !(x & (x - 1)); }

}  // namespace

HostArena::HostArena(HostArenaOptions opts) : opts_(opts) {
  if (!is_pow2(opts_.alignment) || opts_.alignment < 4096)
    throw Error(ErrorKind::Usage, "lohan host tier: alignment must be a power of two >= 4096, got " +
                                      std::to_string(opts_.alignment));
  if (opts_.arena_bytes == 0)
    throw Error(ErrorKind::Usage, "lohan host tier: arena_bytes must be positive");
  opts_.arena_bytes = round_up(opts_.arena_bytes, opts_.alignment);
}

HostArena::~HostArena() {
  std::lock_guard<std::mutex> g(m_);
  for (auto& [id, a] : arenas_) {
    if (a.pinned) cuda_host_unregister(a.base);
    munmap(a.base, a.size);
  }
}

bool HostArena::map_arena(uint64_t need) {
  uint64_t size = std::max(opts_.arena_bytes, need);
  if (opts_.budget != UINT64_MAX) {
    if (reserved_ + need > opts_.budget) return false;
    // A budget that is not a multiple of the arena size gets a smaller last arena.
    uint64_t room = (opts_.budget - reserved_) / opts_.alignment * opts_.alignment;
    if (size > room) size = room;
  }
  char* base = static_cast<char*>(opts_.hugepages ? map_memory(size, false) : nullptr);
  if (!opts_.hugepages) {
    void* m = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    base = m == MAP_FAILED ? nullptr : static_cast<char*>(m);
  }
  if (base == nullptr) {
    int err = errno;
    throw Error(ErrorKind::System,
                "lohan host tier: the OS refused to map a host arena of " + format_bytes(size) +
                    ": " + errno_text(err) +
                    ". Lower host_memory_budget (or arena_bytes), or free host memory.",
                err);
  }
  bool pinned = false;
  if (opts_.pin) {
    try {
      cuda_host_register(base, size);
    } catch (...) {
      munmap(base, size);
      throw;
    }
    pinned = true;
    pinned_ += size;
  }
  uint64_t id = next_arena_++;
  arenas_[id] = Arena{base, size, pinned};
  ext_.add_region(id, size);
  reserved_ += size;
  if (reserved_ > peak_reserved_) peak_reserved_ = reserved_;
  return true;
}

void HostArena::unmap_arena(uint64_t id) {
  Arena a = arenas_.at(id);
  ext_.remove_region(id);
  arenas_.erase(id);
  if (a.pinned) {
    cuda_host_unregister(a.base);
    pinned_ -= a.size;
  }
  munmap(a.base, a.size);
  reserved_ -= a.size;
}

uint64_t HostArena::trim_locked() {
  uint64_t released = 0;
  std::vector<uint64_t> empty;
  for (const auto& [id, a] : arenas_)
    if (ext_.region_empty(id)) empty.push_back(id);
  for (uint64_t id : empty) {
    released += arenas_.at(id).size;
    unmap_arena(id);
  }
  return released;
}

void* HostArena::try_allocate_locked(uint64_t nbytes) {
  uint64_t size = round_up(nbytes == 0 ? 1 : nbytes, opts_.alignment);
  auto ext = ext_.allocate(size);
  if (!ext && map_arena(size)) ext = ext_.allocate(size);
  if (!ext && trim_locked() > 0 && map_arena(size)) ext = ext_.allocate(size);
  if (!ext) {
    ++failed_;
    return nullptr;
  }
  char* p = arenas_.at(ext->region).base + ext->offset;
  live_[reinterpret_cast<uintptr_t>(p)] = Live{ext->region, ext->offset, size, nbytes};
  requested_ += nbytes;
  ++allocs_;
  if (ext_.used_bytes() > peak_in_use_) peak_in_use_ = ext_.used_bytes();
  return p;
}

void* HostArena::try_allocate(uint64_t nbytes) {
  std::lock_guard<std::mutex> g(m_);
  return try_allocate_locked(nbytes);
}

void* HostArena::allocate(uint64_t nbytes) {
  std::lock_guard<std::mutex> g(m_);
  void* p = try_allocate_locked(nbytes);
  if (p) return p;
  throw Error(ErrorKind::Budget,
              "lohan host tier: host_memory_budget exceeded: a block of " + format_bytes(nbytes) +
                  " does not fit (in use " + format_bytes(ext_.used_bytes()) + ", reserved " +
                  format_bytes(reserved_) + " of a budget of " + format_bytes(opts_.budget) +
                  ", largest free block " + format_bytes(ext_.largest_free()) +
                  "). Raise host_memory_budget, give an ssd_dir so that blocks spill to "
                  "the SSD tier, or keep fewer tensors on the host at once.");
}

void HostArena::free(void* p) {
  std::lock_guard<std::mutex> g(m_);
  auto it = live_.find(reinterpret_cast<uintptr_t>(p));
  if (it == live_.end())
    throw Error(ErrorKind::Usage,
                "lohan host tier: free of a pointer that is not a live host block (double free?)");
  ext_.release(it->second.region, it->second.offset);
  requested_ -= it->second.requested;
  ++frees_;
  live_.erase(it);
}

uint64_t HostArena::block_size(const void* p) const {
  std::lock_guard<std::mutex> g(m_);
  auto it = live_.find(reinterpret_cast<uintptr_t>(p));
  return it == live_.end() ? 0 : it->second.size;
}

HostArenaStats HostArena::stats() const {
  std::lock_guard<std::mutex> g(m_);
  HostArenaStats s;
  s.in_use_bytes = ext_.used_bytes();
  s.requested_bytes = requested_;
  s.peak_in_use_bytes = peak_in_use_;
  s.reserved_bytes = reserved_;
  s.peak_reserved_bytes = peak_reserved_;
  s.free_bytes = ext_.free_bytes();
  s.largest_free_bytes = ext_.largest_free();
  s.free_blocks = ext_.free_blocks();
  s.live_blocks = live_.size();
  s.arenas = arenas_.size();
  s.pinned_bytes = pinned_;
  s.allocs = allocs_;
  s.frees = frees_;
  s.failed_allocs = failed_;
  s.budget_bytes = opts_.budget;
  s.alignment = opts_.alignment;
  return s;
}

void HostArena::reset_peak() {
  std::lock_guard<std::mutex> g(m_);
  peak_in_use_ = ext_.used_bytes();
  peak_reserved_ = reserved_;
}

void HostArena::set_budget(uint64_t budget) {
  std::lock_guard<std::mutex> g(m_);
  opts_.budget = budget;
  if (reserved_ > budget) trim_locked();
}

uint64_t HostArena::trim() {
  std::lock_guard<std::mutex> g(m_);
  return trim_locked();
}

void HostArena::check() const {
  std::lock_guard<std::mutex> g(m_);
  ext_.check();
  uint64_t live_sum = 0, req_sum = 0;
  for (const auto& [addr, l] : live_) {
    const Arena& a = arenas_.at(l.region);
    if (addr != reinterpret_cast<uintptr_t>(a.base) + l.offset)
      throw std::logic_error("HostArena invariant broken: live block address does not match its extent");
    if (addr % opts_.alignment != 0)
      throw std::logic_error("HostArena invariant broken: misaligned block");
    live_sum += l.size;
    req_sum += l.requested;
  }
  if (live_sum != ext_.used_bytes())
    throw std::logic_error("HostArena invariant broken: live blocks do not add up to the bytes in use");
  if (req_sum != requested_)
    throw std::logic_error("HostArena invariant broken: requested bytes are wrong");
  uint64_t reserved = 0;
  for (const auto& [id, a] : arenas_) reserved += a.size;
  if (reserved != reserved_ || reserved != ext_.used_bytes() + ext_.free_bytes())
    throw std::logic_error("HostArena invariant broken: reserved bytes are wrong");
}

}  // namespace host
}  // namespace lohan
