// The host tier as torch sees it: tensors backed by host-arena blocks or SSD
// blocks, the graph ops lohan::swap_out / swap_in / wait_tensor, and the
// torch classes lohan.HostTier and lohan.CopyEvent behind the Python API
// (lohan_compile/runtime/hosttier.py). host_tier_ops.cpp registers them.
//
// Ownership rules (DESIGN.md, "The CPU stands in for the GPU"):
//   - A host tensor's storage holds its block through the DataPtr context;
//     the block returns to the arena (or its SSD extent to the file) when the
//     last reference dies, on whatever thread that is (the arena is locked).
//   - Device-tier memory (swap_in's result, c10 or the CUDA caching
//     allocator) is allocated here, on the thread that calls the op.
//   - A copy's source and target are kept alive by a pending record (graph
//     ops) or a CopyEvent (Python API) that the *calling* thread owns; copy
//     and I/O threads only see raw pointers. wait_tensor drops the record on
//     the waiting thread, so a device tensor is never freed by a copy thread.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <torch/custom_class.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "copy_engine.h"
#include "host_arena.h"
#include "host_common.h"
#include "ssd_tier.h"

namespace lohan {
namespace tier {

// One submitted copy: what to wait on and what to keep alive until then.
struct Pending {
  std::shared_ptr<host::Completion> cpu;  // copy-engine copy or SSD I/O
  std::shared_ptr<c10::Event> dev;        // CUDA copy on a side stream
  bool host_sync = false;                 // CUDA: wait blocks the host (d2h) or the current stream (h2d)
  c10::Device device = c10::Device(c10::kCPU);
  host::Direction dir = host::Direction::Other;
  uint64_t dev_bytes = 0;                 // CUDA bytes, counted when the wait sees them done
  std::vector<at::Tensor> keep;           // source and target, released by the waiter

  bool query() const {
    if (cpu && !cpu->query()) return false;
    if (dev && !dev->query()) return false;
    return true;
  }
};

// ---- the ops' kernels (registered in host_tier_ops.cpp)

// The graph ops, on the current HostTier.
at::Tensor swap_out_op(const at::Tensor& src);
at::Tensor swap_in_op(const at::Tensor& host, std::optional<c10::Device> device);
at::Tensor wait_tensor_op(const at::Tensor& t);

// Runtime helpers (not for graphs).
// Waits for every pending graph copy; returns how many there were.
int64_t drain_op();
int64_t pending_op();
// [d2h, h2d, ssd_write, ssd_read]: the process-wide byte counters (host::global_counters()).
std::vector<int64_t> bytes_moved_op();
void copy_timeline_record_op(bool on);
// The recorded spans, flattened: [kind, bytes, start_ns, end_ns] per span (kinds as SpanKind).
std::vector<int64_t> copy_timeline_take_op();
int64_t cleanup_stale_op(std::string dir);

}  // namespace tier

// ---- the Python-visible event

class CopyEvent : public torch::CustomClassHolder {
 public:
  explicit CopyEvent(tier::Pending p, uint64_t nbytes);
  // Dropping an event must not free buffers a copy is still using: it waits.
  ~CopyEvent() override;
  void wait();
  bool query() const;
  int64_t nbytes() const;

 private:
  tier::Pending p_;
  uint64_t nbytes_;
  bool waited_ = false;
};

// ---- the manager

class HostTier : public torch::CustomClassHolder {
 public:
  // budget < 0: unlimited. ssd_dirs empty: no SSD tier (several: striped). direct: -1 auto, 0 off, 1 required.
  HostTier(int64_t budget, int64_t arena_bytes, int64_t alignment, bool pin, int64_t copy_threads,
           int64_t copy_chunk_bytes, std::vector<std::string> ssd_dirs, int64_t ssd_files, int64_t ssd_threads,
           int64_t ssd_chunk_bytes, int64_t direct, bool preallocate);
  ~HostTier() override;

  static c10::intrusive_ptr<HostTier> make_default();

  // ---- allocation
  at::Tensor alloc(int64_t nbytes);
  at::Tensor alloc_ssd(int64_t nbytes);
  // A dense host-tier tensor of the given layout (an SSD block with ssd=true).
  // staging: a short-lived buffer of the runtime's (counted apart: the spill reserve is its room)
  at::Tensor empty_strided(std::vector<int64_t> sizes, std::vector<int64_t> strides, at::ScalarType dtype,
                           bool ssd, bool staging);
  // Host memory for `src`'s bytes in the layout dense_strides(src); an SSD
  // block when the budget is full and there is an SSD tier.
  at::Tensor host_like(const at::Tensor& src, bool allow_ssd);
  at::Tensor wrap_host_block_empty(const at::Tensor& src, const std::vector<int64_t>& strides);

  // ---- copies
  // Starts copying src into dst (same sizes and dtype); returns what to wait on.
  tier::Pending start_copy(const at::Tensor& dst, const at::Tensor& src);
  c10::intrusive_ptr<CopyEvent> copy(at::Tensor dst, at::Tensor src);

  // ---- the graph ops' bodies
  at::Tensor swap_out(const at::Tensor& src);
  at::Tensor swap_in(const at::Tensor& host, std::optional<c10::Device> device);

  // ---- introspection
  std::string location(const at::Tensor& t);
  c10::Dict<std::string, int64_t> stats();
  c10::Dict<std::string, std::string> ssd_info();
  // [file, offset, padded bytes] of an SSD-resident tensor (tests corrupt it there).
  std::vector<int64_t> ssd_extent(const at::Tensor& t);
  // Seconds to create and drop `count` tensors of nbytes, in C++: host-tier
  // blocks, or c10 tensors (at::empty) as the baseline. For bench/host_tier.py.
  double bench_alloc(int64_t nbytes, int64_t count, bool c10);

  void reset_peak();
  int64_t trim();
  void set_budget(int64_t b);
  // Bytes of the budget that blocks able to spill (swap_out's) leave free: with an SSD tier they
  // go to SSD once they would eat into it, so the optimizer's staging always finds room.
  void set_spill_reserve(int64_t b);
  int64_t spill_reserve();
  void check();
  int64_t copy_threads();
  bool pinned();
  bool has_ssd();
  bool closed();
  void close();

  // The tier the graph ops use; current() creates a default one on first use.
  static void set_current(std::optional<c10::intrusive_ptr<HostTier>> tier);
  static c10::intrusive_ptr<HostTier> current();
  static std::optional<c10::intrusive_ptr<HostTier>> current_if_set();

 private:
  void check_open();
  static host::Direction direction(const at::Tensor& dst, const at::Tensor& src);
  void start_cuda_copy(tier::Pending& p, const at::Tensor& dst, const at::Tensor& src);
  // One side stream per (device index, direction), created on first use.
  c10::Stream side_stream(c10::Device dev, bool h2d);

  std::shared_ptr<host::HostArena> arena_;
  std::shared_ptr<host::CopyEngine> engine_;
  std::shared_ptr<host::SsdTier> ssd_;
  std::mutex close_m_;
  bool closed_ = false;
  std::atomic<uint64_t> spill_reserve_{0};
  std::shared_ptr<std::atomic<uint64_t>> staging_in_use_ = std::make_shared<std::atomic<uint64_t>>(0);
  std::mutex streams_m_;
  std::map<std::pair<int, bool>, c10::Stream> streams_;
};

}  // namespace lohan
