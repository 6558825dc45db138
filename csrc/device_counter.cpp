// A counting wrapper around c10's CPU allocator: on the CPU stand-in it is the
// device tier's torch.cuda.memory_allocated()/max_memory_allocated().
//
// It counts the bytes of live allocations made through c10's CPU allocator
// after it was installed, keeps the peak since the last reset, and knows
// whether an address is one of its live blocks. Host-tier memory never comes
// from this allocator (DESIGN.md), so on a machine without a GPU these counts
// are the device tier's. Allocation and deallocation still go through the
// default allocator, so the profiler's memory events are unchanged.

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <ATen/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <time.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace lohan {
namespace {

struct DeviceCounter final : at::Allocator {
  explicit DeviceCounter(at::Allocator* inner) : inner_(inner), inner_delete_(inner->raw_deleter()) {
    TORCH_CHECK(inner_delete_ != nullptr,
                "lohan's device counter needs c10's CPU allocator to have a raw deleter");
  }

  at::DataPtr allocate(size_t n) override {
    at::DataPtr d = inner_->allocate(n);
    void* p = d.get();
    // the default allocator's context is the data pointer itself, with a raw deleter
    TORCH_CHECK(d.get_context() == p || p == nullptr, "unexpected context from c10's CPU allocator");
    d.release_context();
    if (p != nullptr) {
      std::lock_guard<std::mutex> guard(mu_);
      sizes_[p] = n;
      live_ += static_cast<int64_t>(n);
      if (live_ > peak_) peak_ = live_;
      ++allocations_;
      note();
    }
    return {p, p, &DeviceCounter::release, at::Device(at::DeviceType::CPU)};
  }

  at::DeleterFnPtr raw_deleter() const override { return &DeviceCounter::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void release(void* p) {
    DeviceCounter* self = instance();
    if (p != nullptr) {
      std::lock_guard<std::mutex> guard(self->mu_);
      auto it = self->sizes_.find(p);
      if (it != self->sizes_.end()) {
        self->live_ -= static_cast<int64_t>(it->second);
        self->sizes_.erase(it);
        self->note();
      }
    }
    self->inner_delete_(p);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> guard(mu_);
    return {live_, peak_, allocations_};
  }

  int64_t reset_peak() {
    std::lock_guard<std::mutex> guard(mu_);
    peak_ = live_;
    return peak_;
  }

  // After a measurement that reset the peak: the peak is at least ``bytes`` again.
  int64_t raise_peak(int64_t bytes) {
    std::lock_guard<std::mutex> guard(mu_);
    if (bytes > peak_) peak_ = bytes;
    return peak_;
  }

  // The memory timeline: while recording, (time, live bytes) after every change, on the
  // monotonic clock (Python's time.perf_counter()); bounded, the oldest dropped first.
  void record(bool on) {
    std::lock_guard<std::mutex> guard(mu_);
    recording_.store(on);
    timeline_.clear();
  }

  std::vector<int64_t> take_timeline() {
    std::lock_guard<std::mutex> guard(mu_);
    std::vector<int64_t> out;
    out.reserve(2 * timeline_.size());
    for (const auto& [t, bytes] : timeline_) {
      out.push_back(t);
      out.push_back(bytes);
    }
    timeline_.clear();
    return out;
  }

  bool contains(uintptr_t address) {
    std::lock_guard<std::mutex> guard(mu_);
    return sizes_.count(reinterpret_cast<void*>(address)) != 0;
  }

  // A storage made before the counter was installed (or outside c10: numpy, a memory map)
  // moves into a block the counter allocates, with the same bytes, and resizes it later
  // through the counter: what the runtime does to it (streaming resizes a parameter's
  // storage to zero and back) is counted however old it is. False when already counted.
  bool adopt(const at::Tensor& t) {
    c10::StorageImpl* impl = t.storage().unsafeGetStorageImpl();
    if (impl->allocator() == this && (impl->nbytes() == 0 || contains(reinterpret_cast<uintptr_t>(impl->data())))) {
      return false;
    }
    const size_t n = impl->nbytes();
    at::DataPtr fresh = allocate(n);
    if (n > 0) std::memcpy(fresh.get(), impl->data(), n);
    impl->set_data_ptr_noswap(std::move(fresh));  // the old block goes through its own deleter
    impl->set_allocator(this);
    impl->set_resizable(true);
    return true;
  }

  // Tests: while paused, new CPU storages come from c10's allocator as before install.
  void pause(bool on) { c10::SetCPUAllocator(on ? inner_ : static_cast<at::Allocator*>(this), /*priority=*/2); }

  static DeviceCounter*& slot() {
    static DeviceCounter* counter = nullptr;
    return counter;
  }
  static DeviceCounter* instance() { return slot(); }

 private:
  static constexpr size_t kTimelineCap = 1 << 18;
  void note() {  // with mu_ held
    if (!recording_.load(std::memory_order_relaxed)) return;
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    if (timeline_.size() >= kTimelineCap) timeline_.pop_front();
    timeline_.emplace_back(static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec, live_);
  }

  at::Allocator* inner_;
  at::DeleterFnPtr inner_delete_;
  std::mutex mu_;
  std::unordered_map<void*, size_t> sizes_;
  int64_t live_ = 0;
  int64_t peak_ = 0;
  int64_t allocations_ = 0;
  std::atomic<bool> recording_{false};
  std::deque<std::pair<int64_t, int64_t>> timeline_;
};

std::mutex install_mu;

bool install() {
  std::lock_guard<std::mutex> guard(install_mu);
  if (DeviceCounter::slot() != nullptr) return false;
  // never freed: blocks allocated through it may outlive any owner
  auto* counter = new DeviceCounter(c10::GetDefaultCPUAllocator());
  DeviceCounter::slot() = counter;
  c10::SetCPUAllocator(counter, /*priority=*/2);
  return true;
}

DeviceCounter& counter() {
  DeviceCounter* c = DeviceCounter::instance();
  TORCH_CHECK(c != nullptr, "lohan's device counter is not installed; call lohan::device_counter_install first");
  return *c;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lohan, m) {
  m.def("device_counter_install() -> bool", &install);
  m.def("device_counter_stats() -> int[]", []() { return counter().stats(); });
  m.def("device_counter_reset_peak() -> int", []() { return counter().reset_peak(); });
  m.def("device_counter_record(bool on) -> ()", [](bool on) { counter().record(on); });
  m.def("device_counter_take_timeline() -> int[]", []() { return counter().take_timeline(); });
  m.def("device_counter_raise_peak(int bytes) -> int", [](int64_t bytes) { return counter().raise_peak(bytes); });
  m.def("device_counter_adopt(Tensor(a!) t) -> bool", [](const at::Tensor& t) { return counter().adopt(t); });
  m.def("device_counter_pause(bool on) -> ()", [](bool on) { counter().pause(on); });
  m.def("device_counter_contains(int address) -> bool",
        [](int64_t address) { return counter().contains(static_cast<uintptr_t>(address)); });
}

}  // namespace lohan
