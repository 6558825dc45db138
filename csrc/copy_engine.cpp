#include "copy_engine.h"

#include <pthread.h>

#include <algorithm>
#include <cstring>
#include <system_error>
#include <time.h>

namespace lohan {
namespace host {

ByteCounters& global_counters() {
  static ByteCounters c;
  return c;
}

namespace {
std::atomic<bool> g_recording{false};
std::mutex g_timeline_m;
std::deque<Span> g_timeline;
}  // namespace

int64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

bool timeline_recording() { return g_recording.load(std::memory_order_relaxed); }

void set_timeline_recording(bool on) {
  g_recording.store(on, std::memory_order_relaxed);
  if (!on) {
    std::lock_guard<std::mutex> g(g_timeline_m);
    g_timeline.clear();
  }
}

void record_span(SpanKind kind, uint64_t bytes, int64_t start_ns, int64_t end_ns) {
  std::lock_guard<std::mutex> g(g_timeline_m);
  if (g_timeline.size() >= kTimelineCap) g_timeline.pop_front();
  g_timeline.push_back(Span{kind, bytes, start_ns, end_ns});
}

std::vector<Span> take_timeline() {
  std::lock_guard<std::mutex> g(g_timeline_m);
  std::vector<Span> out(g_timeline.begin(), g_timeline.end());
  g_timeline.clear();
  return out;
}

CopyEngine::CopyEngine(int threads, uint64_t chunk_bytes)
    : chunk_(chunk_bytes == 0 ? (2ull << 20) : chunk_bytes) {
  if (threads < 1)
    throw Error(ErrorKind::Usage, "lohan copy engine: needs at least one thread, got " +
                                      std::to_string(threads));
  try {
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { run(); });
  } catch (const std::system_error& e) {
    shutdown();
    throw Error(ErrorKind::System, std::string("lohan copy engine: could not start a thread: ") + e.what());
  }
  for (auto& w : workers_) pthread_setname_np(w.native_handle(), "lohan-copy");
}

CopyEngine::~CopyEngine() { shutdown(); }

void CopyEngine::shutdown() {
  {
    std::lock_guard<std::mutex> g(m_);
    if (stop_ && workers_.empty()) return;
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& w : workers_)
    if (w.joinable()) w.join();
  workers_.clear();
}

void CopyEngine::submit(std::vector<Task>& tasks) {
  {
    std::lock_guard<std::mutex> g(m_);
    if (stop_) throw Error(ErrorKind::Usage, "lohan copy engine: submit after shutdown");
    for (auto& t : tasks) queue_.push_back(std::move(t));
  }
  if (tasks.size() == 1)
    cv_.notify_one();
  else
    cv_.notify_all();
}

std::shared_ptr<Completion> CopyEngine::copy(void* dst, const void* src, uint64_t n, Direction d) {
  uint64_t parts = (n + chunk_ - 1) / chunk_;
  auto done = std::make_shared<Completion>(static_cast<int64_t>(parts));
  std::vector<Task> tasks;
  tasks.reserve(parts);
  for (uint64_t off = 0; off < n; off += chunk_)
    tasks.push_back(Task{static_cast<char*>(dst) + off, static_cast<const char*>(src) + off,
                         std::min(chunk_, n - off), 0, nullptr, done, d});
  submit(tasks);
  return done;
}

std::shared_ptr<Completion> CopyEngine::gather(void* dst, const void* src, std::vector<int64_t> sizes,
                                               std::vector<int64_t> strides, uint64_t elem, Direction d) {
  // Drop size-1 dims, then merge dims that are contiguous with the next one,
  // so rows are as long as the layout allows.
  std::vector<int64_t> sz, st;
  uint64_t numel = 1;
  for (size_t i = 0; i < sizes.size(); ++i) {
    numel *= static_cast<uint64_t>(sizes[i]);
    if (sizes[i] != 1) {
      sz.push_back(sizes[i]);
      st.push_back(strides[i]);
    }
  }
  if (numel == 0) return std::make_shared<Completion>(0);
  for (size_t i = sz.size(); i-- > 1;) {
    if (st[i - 1] == st[i] * sz[i]) {
      sz[i - 1] *= sz[i];
      st[i - 1] = st[i];
      sz.erase(sz.begin() + i);
      st.erase(st.begin() + i);
    }
  }
  auto plan = std::make_shared<GatherPlan>();
  if (!sz.empty() && st.back() == static_cast<int64_t>(elem)) {
    plan->row_bytes = static_cast<uint64_t>(sz.back()) * elem;
    sz.pop_back();
    st.pop_back();
  } else {
    plan->row_bytes = elem;
  }
  plan->sizes = sz;
  plan->strides = st;
  plan->row_stride = 0;
  uint64_t rows = 1;
  for (int64_t s : sz) rows *= static_cast<uint64_t>(s);
  uint64_t rows_per_task = std::max<uint64_t>(1, chunk_ / plan->row_bytes);
  uint64_t parts = (rows + rows_per_task - 1) / rows_per_task;
  auto done = std::make_shared<Completion>(static_cast<int64_t>(parts));
  std::vector<Task> tasks;
  tasks.reserve(parts);
  for (uint64_t r = 0; r < rows; r += rows_per_task)
    tasks.push_back(Task{static_cast<char*>(dst), static_cast<const char*>(src),
                         std::min(rows_per_task, rows - r), r, plan, done, d});
  submit(tasks);
  return done;
}

void CopyEngine::execute(const Task& t) {
  if (!t.plan) {
    std::memcpy(t.dst, t.src, t.n);
    counters_.add(t.dir, t.n);
    global_counters().add(t.dir, t.n);
    return;
  }
  const GatherPlan& p = *t.plan;
  const size_t nd = p.sizes.size();
  // Unravel the first row's index, then step it like an odometer.
  std::vector<int64_t> idx(nd, 0);
  uint64_t r = t.row0;
  for (size_t i = nd; i-- > 0;) {
    idx[i] = static_cast<int64_t>(r % static_cast<uint64_t>(p.sizes[i]));
    r /= static_cast<uint64_t>(p.sizes[i]);
  }
  int64_t src_off = 0;
  for (size_t i = 0; i < nd; ++i) src_off += idx[i] * p.strides[i];
  char* out = t.dst + t.row0 * p.row_bytes;
  for (uint64_t k = 0; k < t.n; ++k) {
    std::memcpy(out, t.src + src_off, p.row_bytes);
    out += p.row_bytes;
    for (size_t i = nd; i-- > 0;) {
      src_off += p.strides[i];
      if (++idx[i] < p.sizes[i]) break;
      src_off -= p.strides[i] * p.sizes[i];
      idx[i] = 0;
    }
  }
  uint64_t bytes = t.n * p.row_bytes;
  counters_.add(t.dir, bytes);
  global_counters().add(t.dir, bytes);
}

void CopyEngine::run() {
  for (;;) {
    Task t;
    {
      std::unique_lock<std::mutex> g(m_);
      cv_.wait(g, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and drained
      t = std::move(queue_.front());
      queue_.pop_front();
    }
    if (timeline_recording()) {
      int64_t start = monotonic_ns();
      execute(t);
      uint64_t bytes = t.plan ? t.n * t.plan->row_bytes : t.n;
      record_span(static_cast<SpanKind>(static_cast<int64_t>(t.dir)), bytes, start, monotonic_ns());
    } else {
      execute(t);
    }
    t.done->part_done();
  }
}

}  // namespace host
}  // namespace lohan
