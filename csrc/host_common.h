// Shared pieces of the host memory manager: errors and completions.
//
// Everything under lohan::host (host_arena, copy_engine, ssd_tier, cuda_pin)
// is plain C++17 with no torch dependency, so the sanitizer build
// (scripts/sanitize.sh) can compile it with a standalone stress test.
// host_tier.cpp is the only file that turns these into tensors and ops
// (host_tier_ops.cpp registers them).

#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>

namespace lohan {
namespace host {

// What went wrong, so the torch layer can raise the matching Python type.
enum class ErrorKind {
  Budget,   // host_memory_budget would be exceeded (and there is no SSD tier to spill to)
  Storage,  // the SSD tier: no space, I/O error, short read, bad folder, checksum mismatch
  Usage,    // the caller broke a contract (double free, wrong size, closed tier)
  System,   // the OS refused memory or threads
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& msg, int err = 0)
      : std::runtime_error(msg), kind_(kind), errno_(err) {}
  ErrorKind kind() const { return kind_; }
  int err() const { return errno_; }

 private:
  ErrorKind kind_;
  int errno_;
};

// "No space left on device (errno 28)"
std::string errno_text(int err);

// Human-readable byte count for messages ("1.50 GiB").
std::string format_bytes(uint64_t n);

inline uint64_t round_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

// Anonymous memory, 2 MiB-aligned and advised for transparent huge pages when
// at least 2 MiB (fewer page faults, and direct I/O into it is far faster on
// virtual disks that split requests per 4 KiB page). `touch` faults it in
// now. Returns nullptr if the OS refuses (errno set); release with munmap.
void* map_memory(uint64_t size, bool touch);

// The completion of one asynchronous operation made of `parts` independent
// pieces (chunks). Workers call part_done()/part_failed(); the step thread
// calls wait(), which rethrows the first failure. Thread-safe.
class Completion {
 public:
  explicit Completion(int64_t parts) : remaining_(parts), done_(parts == 0) {}
  Completion(const Completion&) = delete;
  Completion& operator=(const Completion&) = delete;

  // Runs once, on the thread that finishes the last part, before waiters wake.
  // Set before any part can finish (i.e. before submitting). Must not throw.
  void on_complete(std::function<void(bool failed)> fn) { hook_ = std::move(fn); }

  void part_done() { finish(nullptr, ErrorKind::Storage, 0); }
  void part_failed(const std::string& msg, ErrorKind kind, int err) { finish(&msg, kind, err); }

  bool query() const {
    std::lock_guard<std::mutex> g(m_);
    return done_;
  }

  // Blocks until every part finished; throws the first failure.
  void wait() const {
    std::unique_lock<std::mutex> g(m_);
    cv_.wait(g, [this] { return done_; });
    if (failed_) throw Error(kind_, msg_, errno_);
  }

  bool failed() const {
    std::lock_guard<std::mutex> g(m_);
    return failed_;
  }

 private:
  void finish(const std::string* msg, ErrorKind kind, int err) {
    std::function<void(bool)> hook;
    bool failed;
    {
      std::lock_guard<std::mutex> g(m_);
      if (msg != nullptr && !failed_) {
        failed_ = true;
        msg_ = *msg;
        kind_ = kind;
        errno_ = err;
      }
      if (--remaining_ != 0) return;
      hook = std::move(hook_);
      failed = failed_;
    }
    // The hook runs outside the lock but before waiters are woken: it may
    // publish state (an SSD block becoming readable) that a waiter relies on.
    if (hook) hook(failed);
    std::lock_guard<std::mutex> g(m_);
    done_ = true;
    cv_.notify_all();
  }

  mutable std::mutex m_;
  mutable std::condition_variable cv_;
  int64_t remaining_;
  bool done_;
  bool failed_ = false;
  std::string msg_;
  ErrorKind kind_ = ErrorKind::Storage;
  int errno_ = 0;
  std::function<void(bool)> hook_;
};

}  // namespace host
}  // namespace lohan
