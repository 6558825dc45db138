// torch.ops.lohan.adam_update / grad_stats / adam_isa: the CPU optimizer's ops.
//
// adam_update updates a bucket of tensors (one or many parameters) in one
// call: the elements of every tensor are cut into fixed chunks, the chunks
// are shared among the calling thread and the pool's workers (adam_pool.h),
// and each chunk's gradient statistics are kept apart and added up in chunk
// order, so the result does not depend on the thread count (nor on which
// threads run it: see run_tasks). The Python
// binding of torch.ops releases the GIL around the call, so a Python thread
// that runs the optimizer does not stop the others (tests/test_cpu_adamw.py
// measures it).
//
// Argument checks raise c10::Error (RuntimeError in Python) with a message
// that names the tensor; lohan_compile/optim.py checks the same things
// earlier with friendlier messages.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "adam_kernel.h"
#include "adam_pool.h"

namespace lohan {
namespace {

using adam::DType;
using adam::Isa;

// Elements per task: 16 tasks in a 1M-element bucket, so two threads still
// share one evenly, and about 1.8 MiB of traffic each (fp32). Tasks of 1 << 14
// ran the bench's 40M-element step about 6% slower on two threads
// (bench/optimizer.py; the README has the figures): each task starts seven
// new memory streams, and the hardware prefetchers ramp up again for each.
// A multiple of 64, so tasks never share a cache line.
constexpr int64_t kChunk = 1 << 16;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: return DType::kNone;
  }
}

Isa parse_isa_or_throw(const std::string& name) {
  Isa isa;
  TORCH_CHECK(adam::parse_isa(name, &isa), "lohan: unknown instruction set '", name,
              "'; choose one of auto, scalar, avx2, avx512, avx512_bf16");
  TORCH_CHECK(adam::isa_supported(isa), "lohan: this CPU does not support the '", name,
              "' instruction set (best available: ", adam::isa_name(adam::best_isa()), ")");
  return adam::resolve(isa);
}

int resolve_threads(int64_t num_threads) {
  if (num_threads > 0) return static_cast<int>(std::min<int64_t>(num_threads, 256));
  return std::max(1, at::get_num_threads());
}

void check_dense_cpu(const at::Tensor& t, const char* op, const char* what, size_t i) {
  TORCH_CHECK(t.layout() == c10::kStrided, "lohan::", op, ": ", what, "[", i,
              "] must be a dense tensor, got layout ", t.layout());
  TORCH_CHECK(t.device().is_cpu(), "lohan::", op, ": ", what, "[", i,
              "] must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.is_contiguous(), "lohan::", op, ": ", what, "[", i, "] must be contiguous");
  // A host-tier block spilled to the SSD tier has no host memory (its data pointer is null):
  // it must be read back first. Reading it here would crash the process.
  TORCH_CHECK_VALUE(t.numel() == 0 || t.data_ptr() != nullptr, "lohan::", op, ": ", what, "[", i,
                    "] has no host memory (a block of the host tier spilled to the SSD tier); "
                    "read it into host memory first");
}

// Runs fn(0) ... fn(n - 1) on `threads` threads. On a thread that runs torch's
// own ops (the user's, in CPUAdamW.step), torch's OpenMP team does it: after
// any parallel torch op its threads spin for a while before they sleep, and
// the pool's workers would compete with them for the cores (the bench lost
// about 5% to that right after torch's step). On the background update thread
// the pool does it: an OpenMP region there would start a second team beside
// the one backward is using. The extension is built with -fopenmp where torch
// itself uses OpenMP and links no OpenMP runtime of its own: the GOMP symbols
// resolve to the one libtorch_cpu loads, so the team is torch's. Each thread
// of the team takes one contiguous run of tasks (static schedule): long
// streams through memory, as torch's own kernels split their work.
//
// A forked child never uses the team: libgomp's threads do not survive a fork,
// and a parallel region in the child of a parent that had one waits forever.
// (torch's DataLoader workers set one thread for the same reason.)
std::atomic<bool> g_forked{false};

void note_fork() { g_forked.store(true); }
// Registered when the extension loads: a fork before the first call counts too
// (torch's own ops may have started the team by then).
[[maybe_unused]] const bool g_fork_noted = pthread_atfork(nullptr, nullptr, &note_fork) == 0;

//
// fn must not throw (an exception cannot leave an OpenMP region): the callers'
// argument checks all run before it. Inside a parallel region already (a nested
// one would run on one thread) the pool does the work too.
void run_tasks(int64_t n, int threads, bool torch_team, const std::function<void(int64_t)>& fn) {
#ifdef _OPENMP
  if (torch_team && threads > 1 && n > 1 && !g_forked.load() && !omp_in_parallel()) {
    const int team = static_cast<int>(std::min<int64_t>(threads, n));  // (no thread woken for nothing)
#pragma omp parallel for schedule(static) num_threads(team)
    for (int64_t k = 0; k < n; ++k) fn(k);
    return;
  }
#else
  (void)torch_team;
#endif
  TaskPool::instance().run(n, threads, fn);
}

struct Chunk {
  size_t tensor;
  int64_t begin, end;
};

std::vector<Chunk> cut(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunk) {
      chunks.push_back({t, b, std::min(numels[t], b + kChunk)});
    }
  }
  return chunks;
}

at::Tensor stats_tensor(const std::vector<adam::Stats>& per_chunk) {
  double sumsq = 0.0;
  bool nonfinite = false;
  for (const adam::Stats& s : per_chunk) {  // chunk order: independent of threads
    sumsq += s.sumsq;
    nonfinite = nonfinite || s.nonfinite;
  }
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  o[0] = sumsq;
  o[1] = nonfinite ? 1.0 : 0.0;
  return out;
}

at::Tensor adam_update_cpu(at::TensorList master, at::TensorList exp_avg,
                           at::TensorList exp_avg_sq, at::TensorList grad,
                           at::TensorList weight_out, at::ArrayRef<double> step, double lr,
                           double beta1, double beta2, double eps, double weight_decay,
                           bool decoupled_weight_decay, double grad_scale,
                           c10::string_view isa_name, int64_t num_threads, bool torch_threads) {
  const size_t n = master.size();
  TORCH_CHECK(exp_avg.size() == n && exp_avg_sq.size() == n && grad.size() == n &&
                  step.size() == n,
              "lohan::adam_update: master, exp_avg, exp_avg_sq, grad and step must have the "
              "same length, got ",
              n, ", ", exp_avg.size(), ", ", exp_avg_sq.size(), ", ", grad.size(), ", ",
              step.size());
  TORCH_CHECK(weight_out.empty() || weight_out.size() == n,
              "lohan::adam_update: weight_out must be empty or as long as master (", n,
              "), got ", weight_out.size());
  const Isa isa = parse_isa_or_throw(std::string(isa_name));

  std::vector<adam::TensorArgs> args(n);
  std::vector<adam::Consts> consts(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    check_dense_cpu(master[i], "adam_update", "master", i);
    check_dense_cpu(exp_avg[i], "adam_update", "exp_avg", i);
    check_dense_cpu(exp_avg_sq[i], "adam_update", "exp_avg_sq", i);
    check_dense_cpu(grad[i], "adam_update", "grad", i);
    TORCH_CHECK(master[i].scalar_type() == at::kFloat && exp_avg[i].scalar_type() == at::kFloat &&
                    exp_avg_sq[i].scalar_type() == at::kFloat,
                "lohan::adam_update: master, exp_avg and exp_avg_sq must be float32; tensor ", i,
                " has ", master[i].scalar_type(), ", ", exp_avg[i].scalar_type(), ", ",
                exp_avg_sq[i].scalar_type());
    TORCH_CHECK(dtype_of(grad[i]) != DType::kNone, "lohan::adam_update: grad[", i,
                "] must be float32, bfloat16 or float16, got ", grad[i].scalar_type());
    TORCH_CHECK(exp_avg[i].sizes() == master[i].sizes() &&
                    exp_avg_sq[i].sizes() == master[i].sizes() &&
                    grad[i].sizes() == master[i].sizes(),
                "lohan::adam_update: shapes of tensor ", i, " differ: master ", master[i].sizes(),
                ", exp_avg ", exp_avg[i].sizes(), ", exp_avg_sq ", exp_avg_sq[i].sizes(),
                ", grad ", grad[i].sizes());
    TORCH_CHECK(step[i] >= 1.0, "lohan::adam_update: step[", i,
                "] must be at least 1 (the step count after this update), got ", step[i]);
    args[i] = {master[i].data_ptr<float>(), exp_avg[i].data_ptr<float>(),
               exp_avg_sq[i].data_ptr<float>(), grad[i].const_data_ptr(), dtype_of(grad[i]),
               nullptr, DType::kNone};
    if (!weight_out.empty()) {
      const at::Tensor& w = weight_out[i];
      check_dense_cpu(w, "adam_update", "weight_out", i);
      TORCH_CHECK(dtype_of(w) != DType::kNone, "lohan::adam_update: weight_out[", i,
                  "] must be float32, bfloat16 or float16, got ", w.scalar_type());
      TORCH_CHECK(w.sizes() == master[i].sizes(), "lohan::adam_update: weight_out[", i,
                  "] has shape ", w.sizes(), ", master has ", master[i].sizes());
      args[i].out = w.data_ptr();
      args[i].out_dtype = dtype_of(w);
    }
    numels[i] = master[i].numel();

    // Each scalar is computed in double and rounded to fp32 exactly where
    // torch.optim.AdamW's single-tensor path does it (Python floats in, ATen
    // casting the Python scalar to the tensor's fp32 at each op); only the
    // reciprocal of bc2_sqrt is new (one division less, see adam_body.h).
    const double bias_correction1 = 1.0 - std::pow(beta1, step[i]);
    const double bias_correction2 = 1.0 - std::pow(beta2, step[i]);
    adam::Consts& c = consts[i];
    c.grad_scale = static_cast<float>(grad_scale);
    c.decay = static_cast<float>(1.0 - lr * weight_decay);
    c.weight_decay = static_cast<float>(weight_decay);
    c.lerp_weight = static_cast<float>(1.0 - beta1);
    c.beta2 = static_cast<float>(beta2);
    c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    c.eps = static_cast<float>(eps);
    c.neg_step_size = static_cast<float>(-(lr / bias_correction1));
    c.inv_bias_correction2_sqrt = static_cast<float>(1.0 / std::pow(bias_correction2, 0.5));
    c.decoupled = decoupled_weight_decay;
    c.has_weight_decay = weight_decay != 0.0;
  }

  // Threads update different chunks at once: one tensor listed twice would race.
  std::vector<const float*> starts;
  for (size_t i = 0; i < n; ++i) {
    if (numels[i] > 0) starts.push_back(args[i].master);
  }
  std::sort(starts.begin(), starts.end());
  TORCH_CHECK(std::adjacent_find(starts.begin(), starts.end()) == starts.end(),
              "lohan::adam_update: the same master tensor is listed twice");

  const std::vector<Chunk> chunks = cut(numels);
  std::vector<adam::Stats> stats(chunks.size());
  run_tasks(
      static_cast<int64_t>(chunks.size()), resolve_threads(num_threads), torch_threads, [&](int64_t k) {
        const Chunk& ch = chunks[k];
        stats[k] = adam::adam_range(isa, consts[ch.tensor], args[ch.tensor], ch.begin, ch.end);
      });
  return stats_tensor(stats);
}

at::Tensor grad_stats_cpu(at::TensorList grad, double grad_scale, c10::string_view isa_name,
                          int64_t num_threads, bool torch_threads) {
  const Isa isa = parse_isa_or_throw(std::string(isa_name));
  std::vector<int64_t> numels(grad.size());
  for (size_t i = 0; i < grad.size(); ++i) {
    check_dense_cpu(grad[i], "grad_stats", "grad", i);
    TORCH_CHECK(dtype_of(grad[i]) != DType::kNone, "lohan::grad_stats: grad[", i,
                "] must be float32, bfloat16 or float16, got ", grad[i].scalar_type());
    numels[i] = grad[i].numel();
  }
  const std::vector<Chunk> chunks = cut(numels);
  std::vector<adam::Stats> stats(chunks.size());
  const float scale = static_cast<float>(grad_scale);
  run_tasks(
      static_cast<int64_t>(chunks.size()), resolve_threads(num_threads), torch_threads, [&](int64_t k) {
        const Chunk& ch = chunks[k];
        const at::Tensor& g = grad[ch.tensor];
        stats[k] = adam::grad_stats_range(isa, g.const_data_ptr(), dtype_of(g), scale, ch.begin,
                                          ch.end);
      });
  return stats_tensor(stats);
}

std::string adam_isa(c10::string_view name) {
  return adam::isa_name(parse_isa_or_throw(std::string(name)));
}

std::vector<std::string> adam_supported_isas() {
  std::vector<std::string> out;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16}) {
    if (adam::isa_supported(isa)) out.emplace_back(adam::isa_name(isa));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lohan, m) {
  m.def(
      "adam_update(Tensor(a!)[] master, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
      "Tensor[] grad, Tensor(d!)[] weight_out, float[] step, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled_weight_decay=True, "
      "float grad_scale=1.0, str isa=\"auto\", int num_threads=0, bool torch_threads=False) -> Tensor");
  m.def("grad_stats(Tensor[] grad, float grad_scale=1.0, str isa=\"auto\", int num_threads=0, "
        "bool torch_threads=False) -> Tensor");
  m.def("adam_isa(str isa=\"auto\") -> str", &adam_isa);
  m.def("adam_supported_isas() -> str[]", &adam_supported_isas);
}

TORCH_LIBRARY_IMPL(lohan, CPU, m) {
  m.impl("adam_update", &adam_update_cpu);
  m.impl("grad_stats", &grad_stats_cpu);
}

}  // namespace lohan
