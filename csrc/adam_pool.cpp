#include "adam_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace lohan {
namespace {

constexpr int kMaxWorkers = 255;

struct Job {
  const std::function<void(int64_t)>* fn;
  int64_t n;
  std::atomic<int64_t> next{0};
  int helpers_wanted = 0;  // guarded by Impl::mu
  int helpers_active = 0;  // guarded by Impl::mu

  // Claims tasks until none are left; used by the caller and its helpers alike.
  void work() {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      (*fn)(i);
    }
  }
};

}  // namespace

struct TaskPool::Impl {
  std::mutex mu;
  std::condition_variable work_cv;  // workers: a job wants helpers
  std::condition_variable done_cv;  // callers: a helper left a job
  std::deque<Job*> jobs;            // jobs that still want helpers
  std::vector<std::thread> threads;

  void worker_loop() {
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
      work_cv.wait(lk, [&] { return !jobs.empty(); });
      Job* job = jobs.front();
      // Counted as active before the lock is dropped, so the caller cannot
      // return (and free the job on its stack) while this thread uses it.
      ++job->helpers_active;
      if (--job->helpers_wanted == 0) jobs.pop_front();
      lk.unlock();
      job->work();
      lk.lock();
      if (--job->helpers_active == 0) done_cv.notify_all();
    }
  }

  void grow_to(int n) {  // mu held
    n = std::min(n, kMaxWorkers);
    while (static_cast<int>(threads.size()) < n) {
      threads.emplace_back([this] { worker_loop(); });
    }
  }
};

namespace {

// Leaked on purpose: workers block on its mutex until the process ends, and
// destroying it at exit (while they wait) would be undefined.
std::atomic<TaskPool::Impl*> g_impl{nullptr};

// A forked child has none of the parent's threads, and the parent's mutex may
// have been held at the fork: the child starts a fresh pool (the old one leaks).
void reset_after_fork() { g_impl.store(nullptr); }

}  // namespace

TaskPool& TaskPool::instance() {
  static TaskPool* pool = [] {
    pthread_atfork(nullptr, nullptr, &reset_after_fork);
    return new TaskPool();
  }();
  return *pool;
}

TaskPool::Impl* TaskPool::impl() {
  Impl* p = g_impl.load(std::memory_order_acquire);
  if (p != nullptr) return p;
  Impl* fresh = new Impl();
  if (g_impl.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return fresh;
  delete fresh;  // another thread won the race; p now holds its pool
  return p;
}

int TaskPool::workers() const {
  Impl* p = const_cast<TaskPool*>(this)->impl();
  std::lock_guard<std::mutex> lk(p->mu);
  return static_cast<int>(p->threads.size());
}

void TaskPool::run(int64_t n_tasks, int threads, const std::function<void(int64_t)>& fn) {
  if (n_tasks <= 0) return;
  const int64_t helpers = std::min<int64_t>(std::max(threads, 1), n_tasks) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n_tasks; ++i) fn(i);
    return;
  }
  Impl* p = impl();
  Job job;
  job.fn = &fn;
  job.n = n_tasks;
  // helpers_wanted belongs to the workers once the job is queued: count from a copy.
  const int wanted = static_cast<int>(std::min<int64_t>(helpers, kMaxWorkers));
  job.helpers_wanted = wanted;
  {
    std::lock_guard<std::mutex> lk(p->mu);
    p->grow_to(wanted);
    p->jobs.push_back(&job);
  }
  for (int i = 0; i < wanted; ++i) p->work_cv.notify_one();
  job.work();
  // All tasks are claimed. Withdraw the job so no late helper joins, then wait
  // for the helpers still finishing a task.
  std::unique_lock<std::mutex> lk(p->mu);
  auto it = std::find(p->jobs.begin(), p->jobs.end(), &job);
  if (it != p->jobs.end()) p->jobs.erase(it);
  p->done_cv.wait(lk, [&] { return job.helpers_active == 0; });
}

}  // namespace lohan
