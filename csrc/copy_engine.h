// The copy engine of the CPU stand-in: worker threads that move bytes
// between the device tier and the host tier in chunks.
//
// On the CPU stand-in "device" tensors are ordinary CPU tensors, so a
// device<->host copy is a memcpy; doing it on worker threads in chunks is
// what makes it asynchronous, like a copy on a CUDA side stream. Workers
// only read and write buffers whose owners keep them alive until the
// Completion is waited on: a worker never allocates, frees, or touches a
// tensor's reference count (DESIGN.md: device memory is allocated and freed
// on the step thread only). The GIL is never taken.
//
// Bytes are counted where they are moved, per engine and process-wide
// (global_counters(), read by the step tracker for d2h_bytes / h2d_bytes).

#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "host_common.h"

namespace lohan {
namespace host {

enum class Direction : int { D2H = 0, H2D = 1, Other = 2 };

struct ByteCounters {
  std::atomic<uint64_t> d2h{0};        // device tier -> host tier (host memory or SSD)
  std::atomic<uint64_t> h2d{0};        // host tier (host memory or SSD) -> device tier
  std::atomic<uint64_t> other{0};      // host <-> host, device <-> device
  std::atomic<uint64_t> ssd_write{0};  // bytes written to SSD files (payload, not padding)
  std::atomic<uint64_t> ssd_read{0};
  void add(Direction d, uint64_t n) {
    (d == Direction::D2H ? d2h : d == Direction::H2D ? h2d : other).fetch_add(n, std::memory_order_relaxed);
  }
};

// Process-wide counters (every engine and SSD tier adds to them).
ByteCounters& global_counters();

// The copy timeline: while recording, every chunk a copy worker or an SSD
// worker moves is logged with its kind, bytes, and start and end on the
// monotonic clock (what Python's time.perf_counter() reads on Linux), for the
// measured tracks of step traces. Bounded: past kTimelineCap spans, the
// oldest are dropped.
enum class SpanKind : int64_t { D2H = 0, H2D = 1, Other = 2, SsdWrite = 3, SsdRead = 4 };
struct Span {
  SpanKind kind;
  uint64_t bytes;
  int64_t start_ns, end_ns;
};
constexpr size_t kTimelineCap = 1 << 16;
int64_t monotonic_ns();
bool timeline_recording();
void set_timeline_recording(bool on);
void record_span(SpanKind kind, uint64_t bytes, int64_t start_ns, int64_t end_ns);
std::vector<Span> take_timeline();

class CopyEngine {
 public:
  CopyEngine(int threads, uint64_t chunk_bytes);
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  // Copies n bytes; the buffers must not overlap and must outlive the completion.
  std::shared_ptr<Completion> copy(void* dst, const void* src, uint64_t n, Direction d);

  // Gathers a strided array (sizes, strides in bytes, elements of `elem` bytes)
  // into contiguous dst, in row-major order.
  std::shared_ptr<Completion> gather(void* dst, const void* src, std::vector<int64_t> sizes,
                                     std::vector<int64_t> byte_strides, uint64_t elem, Direction d);

  const ByteCounters& counters() const { return counters_; }
  int threads() const { return static_cast<int>(workers_.size()); }
  uint64_t chunk_bytes() const { return chunk_; }
  // Finishes queued work and joins the workers; later submissions throw.
  void shutdown();

 private:
  struct GatherPlan {
    std::vector<int64_t> sizes;    // outer dims (rows), coalesced
    std::vector<int64_t> strides;  // their byte strides
    uint64_t row_bytes;            // contiguous run copied per row
    int64_t row_stride;            // unused when rows are single contiguous runs
  };
  struct Task {
    char* dst;
    const char* src;
    uint64_t n;                          // bytes (copy) or rows [row0, row0 + n) (gather)
    uint64_t row0;
    std::shared_ptr<const GatherPlan> plan;  // null for a plain copy
    std::shared_ptr<Completion> done;
    Direction dir;
  };

  void submit(std::vector<Task>& tasks);
  void run();
  void execute(const Task& t);

  uint64_t chunk_;
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
  ByteCounters counters_;
};

}  // namespace host
}  // namespace lohan
