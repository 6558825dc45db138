// A small thread pool for the CPU optimizer's kernels.
//
// Why not at::parallel_for: the optimizer is called from background threads
// (gradient offload runs it while backward is still going). torch's OpenMP
// pool takes its thread count from per-thread state and, called from a new
// thread, starts another team of threads; two concurrent callers then
// oversubscribe the cores. Here every call names its thread count, several
// callers share one set of workers, and the caller always works too, so a
// call never waits for a busy pool: with every worker taken it runs alone.

#pragma once

#include <cstdint>
#include <functional>

namespace lohan {

class TaskPool {
 public:
  // The process-wide pool (created on first use, grown on demand, never torn
  // down: its threads sleep when idle and end with the process).
  static TaskPool& instance();

  // Runs fn(0) ... fn(n_tasks - 1), each exactly once, on the calling thread
  // and up to threads - 1 workers, and returns when all are done. fn must not
  // throw. Tasks are handed out in index order; which thread runs which task
  // is not fixed, so results that must not depend on it are written per task.
  void run(int64_t n_tasks, int threads, const std::function<void(int64_t)>& fn);

  // Worker threads started so far (for tests).
  int workers() const;

  struct Impl;  // defined in adam_pool.cpp

 private:
  TaskPool() = default;
  Impl* impl();
};

}  // namespace lohan
