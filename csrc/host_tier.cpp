// The host tier's classes, its tensors over arena and SSD blocks, and the
// kernels of its ops (host_tier.h has the ownership rules they keep).

#include "host_tier.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>
#include <torch/custom_class.h>

#include <algorithm>
#include <chrono>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace lohan {
namespace {

using host::Completion;
using host::CopyEngine;
using host::Direction;
using host::ErrorKind;
using host::HostArena;
using host::SsdBlock;
using host::SsdTier;
using tier::Pending;

[[noreturn]] void rethrow(const host::Error& e) {
  std::string msg = e.what();
  // Keep the OS error number readable (hosttier.py sets StorageError.errno from it).
  std::string tag = "(errno " + std::to_string(e.err()) + ")";
  if (e.err() != 0 && msg.find(tag) == std::string::npos) msg += " " + tag;
  if (e.kind() == ErrorKind::Budget) TORCH_CHECK_WITH(OutOfMemoryError, false, msg);
  if (e.kind() == ErrorKind::Usage) TORCH_CHECK_VALUE(false, msg);
  TORCH_CHECK(false, msg);
  throw std::runtime_error(msg);  // unreachable: TORCH_CHECK(false) throws
}

// Runs f, turning the core's errors into torch errors (RuntimeError and
// torch.OutOfMemoryError in Python; hosttier.py maps them to lohan's types).
template <typename F>
auto guarded(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const host::Error& e) {
    rethrow(e);
  }
}

// ---- tensors over blocks -----------------------------------------------------

struct HostBlockCtx {
  std::shared_ptr<HostArena> arena;
  void* ptr;
  // a staging block's bytes are counted here while it lives (HostTier::staging_in_use)
  std::shared_ptr<std::atomic<uint64_t>> staging;
  uint64_t bytes = 0;
};

void delete_host_block(void* ctx) {
  auto* c = static_cast<HostBlockCtx*>(ctx);
  if (c->staging) c->staging->fetch_sub(c->bytes);
  try {
    c->arena->free(c->ptr);
  } catch (...) {
    // a deleter must not throw; the arena's check() would show the leak
  }
  delete c;
}

struct SsdTokenCtx {
  std::shared_ptr<SsdBlock> block;
};

void delete_ssd_token(void* ctx) { delete static_cast<SsdTokenCtx*>(ctx); }

HostBlockCtx* host_ctx(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return nullptr;
  const c10::DataPtr& dp = t.storage().data_ptr();
  return dp.get_deleter() == &delete_host_block ? static_cast<HostBlockCtx*>(dp.get_context()) : nullptr;
}

SsdTokenCtx* ssd_ctx(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return nullptr;
  const c10::DataPtr& dp = t.storage().data_ptr();
  return dp.get_deleter() == &delete_ssd_token ? static_cast<SsdTokenCtx*>(dp.get_context()) : nullptr;
}

bool is_host_tier(const at::Tensor& t) { return host_ctx(t) != nullptr || ssd_ctx(t) != nullptr; }

uint64_t nbytes_of(const at::Tensor& t) {
  return static_cast<uint64_t>(t.numel()) * static_cast<uint64_t>(t.element_size());
}

// The layout a copy keeps: the source's strides when it is dense (a permuted
// tensor stays permuted, its bytes move as one span), contiguous otherwise.
std::vector<int64_t> dense_strides(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) return t.strides().vec();
  std::vector<int64_t> st(t.dim());
  int64_t step = 1;
  for (int64_t i = t.dim() - 1; i >= 0; --i) {
    st[i] = step;
    step *= std::max<int64_t>(t.size(i), 1);
  }
  return st;
}

at::Tensor wrap_host_block(const std::shared_ptr<HostArena>& arena, void* p, at::IntArrayRef sizes,
                           at::IntArrayRef strides, at::ScalarType dtype,
                           std::shared_ptr<std::atomic<uint64_t>> staging = nullptr) {
  auto* ctx = new HostBlockCtx{arena, p, staging, 0};
  if (staging) {
    ctx->bytes = arena->block_size(p);
    staging->fetch_add(ctx->bytes);
  }
  return at::for_blob(p, sizes)
      .strides(strides)
      .context(ctx, &delete_host_block)
      .options(at::TensorOptions().dtype(dtype).device(at::kCPU))
      .make_tensor();
}

// An SSD-resident block has no host memory: its tensor's data pointer is null
// (reading it would crash, which is the point: only swap_in / copy may touch it).
at::Tensor wrap_ssd_block(std::shared_ptr<SsdBlock> block, at::IntArrayRef sizes, at::IntArrayRef strides,
                          at::ScalarType dtype) {
  auto* ctx = new SsdTokenCtx{std::move(block)};
  return at::for_blob(nullptr, sizes)
      .strides(strides)
      .context(ctx, &delete_ssd_token)
      .options(at::TensorOptions().dtype(dtype).device(at::kCPU))
      .make_tensor();
}

// ---- asynchronous operations and their keepalives ------------------------------

// CUDA h2d copies whose host source is still being read after the current
// stream was told to wait: their keepalives are released later, on a
// calling thread, once the event has completed.
std::mutex g_deferred_m;
std::list<Pending> g_deferred;

void release_deferred(bool wait_all) {
  std::list<Pending> done;
  {
    std::lock_guard<std::mutex> g(g_deferred_m);
    for (auto it = g_deferred.begin(); it != g_deferred.end();) {
      if (wait_all || it->query()) {
        auto next = std::next(it);
        done.splice(done.end(), g_deferred, it);
        it = next;
      } else {
        ++it;
      }
    }
  }
  for (auto& p : done)
    if (p.dev) p.dev->synchronize();
  // `done` dies here, on the calling thread
}

// Waits for p; its keepalives are released when p dies, on this thread.
void finish(Pending& p) {
  if (p.cpu) guarded([&] { p.cpu->wait(); });
  if (p.dev) {
    if (p.host_sync) {
      p.dev->synchronize();
    } else {
      // The device tensor is ready for work queued after this point on the
      // current stream; the host source may still be read by the DMA engine.
      c10::impl::VirtualGuardImpl impl(p.device.type());
      p.dev->block(impl.getStream(p.device));
    }
    host::global_counters().add(p.dir, p.dev_bytes);
    if (!p.host_sync && !p.dev->query()) {
      Pending later;
      later.dev = p.dev;
      later.keep = std::move(p.keep);
      std::lock_guard<std::mutex> g(g_deferred_m);
      g_deferred.push_back(std::move(later));
    }
  }
}

// Graph ops: pending copies keyed by their target's storage. The record holds
// the target, so the key cannot be reused while it is there.
std::mutex g_pending_m;
std::unordered_map<const c10::StorageImpl*, Pending> g_pending;

void register_pending(const at::Tensor& target, Pending p) {
  const c10::StorageImpl* key = target.storage().unsafeGetStorageImpl();
  std::optional<Pending> previous;
  {
    std::lock_guard<std::mutex> g(g_pending_m);
    auto it = g_pending.find(key);
    if (it != g_pending.end()) previous = std::move(it->second);
    g_pending[key] = std::move(p);
  }
  if (previous) finish(*previous);
}

std::optional<Pending> take_pending(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return std::nullopt;
  std::lock_guard<std::mutex> g(g_pending_m);
  auto it = g_pending.find(t.storage().unsafeGetStorageImpl());
  if (it == g_pending.end()) return std::nullopt;
  Pending p = std::move(it->second);
  g_pending.erase(it);
  return p;
}

// A tensor about to be read or written by a new copy must not still be the
// target of an earlier one (a swap_in of a swap_out that was not waited).
void settle(const at::Tensor& t) {
  if (auto p = take_pending(t)) finish(*p);
}

// ---- the manager's helpers --------------------------------------------------------

int64_t as_i64(uint64_t v) { return v == UINT64_MAX ? -1 : static_cast<int64_t>(v); }

bool cuda_present() {
  if (!c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA)) return false;
  try {
    return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->deviceCount() > 0;
  } catch (...) {
    return false;
  }
}

std::mutex g_current_m;
c10::intrusive_ptr<HostTier> g_current;

}  // namespace

// ---- the Python-visible event -----------------------------------------------------

CopyEvent::CopyEvent(Pending p, uint64_t nbytes) : p_(std::move(p)), nbytes_(nbytes) {}

CopyEvent::~CopyEvent() {
  // Dropping an event must not free buffers a copy is still using.
  if (!waited_) {
    try {
      finish(p_);
    } catch (const std::exception& e) {
      TORCH_WARN("lohan: a copy whose event was never waited on failed: ", e.what());
    }
  }
}

void CopyEvent::wait() {
  if (waited_) return;
  waited_ = true;
  Pending p = std::move(p_);
  finish(p);  // p's keepalives die here, on the waiting thread
}

bool CopyEvent::query() const { return waited_ || p_.query(); }

int64_t CopyEvent::nbytes() const { return static_cast<int64_t>(nbytes_); }

// ---- the manager ----------------------------------------------------------------

HostTier::HostTier(int64_t budget, int64_t arena_bytes, int64_t alignment, bool pin, int64_t copy_threads,
                   int64_t copy_chunk_bytes, std::vector<std::string> ssd_dirs, int64_t ssd_files, int64_t ssd_threads,
                   int64_t ssd_chunk_bytes, int64_t direct, bool preallocate) {
  guarded([&] {
    host::HostArenaOptions o;
    o.budget = budget < 0 ? UINT64_MAX : static_cast<uint64_t>(budget);
    o.arena_bytes = static_cast<uint64_t>(arena_bytes);
    o.alignment = static_cast<uint64_t>(alignment);
    o.pin = pin;
    arena_ = std::make_shared<HostArena>(o);
    engine_ = std::make_shared<CopyEngine>(static_cast<int>(copy_threads),
                                           static_cast<uint64_t>(copy_chunk_bytes));
    if (!ssd_dirs.empty()) {
      host::SsdOptions so;
      so.dirs = ssd_dirs;
      so.files = static_cast<int>(ssd_files);
      so.threads = static_cast<int>(ssd_threads);
      so.chunk_bytes = static_cast<uint64_t>(ssd_chunk_bytes);
      so.direct = static_cast<int>(direct);
      so.preallocate = preallocate;
      ssd_ = SsdTier::create(so);
    }
    return 0;
  });
}

HostTier::~HostTier() { close(); }

c10::intrusive_ptr<HostTier> HostTier::make_default() {
  unsigned hw = std::thread::hardware_concurrency();
  int64_t threads = hw >= 4 ? 2 : 1;
  return c10::make_intrusive<HostTier>(-1, 256ll << 20, 4096, cuda_present(), threads, 2ll << 20, std::vector<std::string>{}, 2, 4,
                                       4ll << 20, -1, true);
}

at::Tensor HostTier::alloc(int64_t nbytes) {
  check_open();
  TORCH_CHECK_VALUE(nbytes >= 0, "lohan host tier: alloc of a negative size");
  return guarded([&] {
    void* p = arena_->allocate(static_cast<uint64_t>(nbytes));
    return wrap_host_block(arena_, p, {nbytes}, {1}, at::kByte);
  });
}

at::Tensor HostTier::alloc_ssd(int64_t nbytes) {
  check_open();
  TORCH_CHECK_VALUE(nbytes >= 0, "lohan host tier: alloc_ssd of a negative size");
  TORCH_CHECK_VALUE(ssd_, "lohan host tier: this HostTier has no SSD tier (give ssd_dir)");
  return guarded([&] {
    auto b = ssd_->allocate(static_cast<uint64_t>(nbytes));
    return wrap_ssd_block(std::move(b), {nbytes}, {1}, at::kByte);
  });
}

at::Tensor HostTier::empty_strided(std::vector<int64_t> sizes, std::vector<int64_t> strides, at::ScalarType dtype,
                                   bool ssd, bool staging) {
  check_open();
  TORCH_CHECK_VALUE(sizes.size() == strides.size(), "lohan host tier: sizes and strides differ in length");
  uint64_t n = c10::elementSize(dtype);
  for (int64_t s : sizes) {
    TORCH_CHECK_VALUE(s >= 0, "lohan host tier: negative size");
    n *= static_cast<uint64_t>(s);
  }
  if (ssd) {
    TORCH_CHECK_VALUE(ssd_, "lohan host tier: this HostTier has no SSD tier (give ssd_dir)");
    auto b = guarded([&] { return ssd_->allocate(n); });
    return wrap_ssd_block(std::move(b), sizes, strides, dtype);
  }
  void* p = guarded([&] { return arena_->allocate(n); });
  return wrap_host_block(arena_, p, sizes, strides, dtype, staging ? staging_in_use_ : nullptr);
}

at::Tensor HostTier::host_like(const at::Tensor& src, bool allow_ssd) {
  auto strides = dense_strides(src);
  uint64_t n = nbytes_of(src);
  if (n == 0) return wrap_host_block_empty(src, strides);
  const uint64_t reserve = spill_reserve_.load();
  bool room = true;
  if (ssd_ && allow_ssd && reserve > 0) {
    // what is not staging stays out of the reserve, whatever staging holds right now
    auto st = arena_->stats();
    room = st.in_use_bytes - std::min(st.in_use_bytes, staging_in_use_->load()) + n + reserve <= st.budget_bytes;
  }
  void* p = room ? guarded([&] { return arena_->try_allocate(n); }) : nullptr;
  if (p) return wrap_host_block(arena_, p, src.sizes(), strides, src.scalar_type());
  if (ssd_ && allow_ssd) {
    auto b = guarded([&] { return ssd_->allocate(n); });
    return wrap_ssd_block(std::move(b), src.sizes(), strides, src.scalar_type());
  }
  if (ssd_) {
    auto st = arena_->stats();
    TORCH_CHECK_WITH(OutOfMemoryError, false, "lohan host tier: host_memory_budget exceeded: a block of ",
                     host::format_bytes(n), " does not fit (in use ", host::format_bytes(st.in_use_bytes),
                     " of a budget of ", host::format_bytes(st.budget_bytes),
                     "), and blocks of CUDA tensors do not spill to the SSD tier yet. "
                     "Raise host_memory_budget or keep fewer tensors on the host at once.");
  }
  guarded([&] { return arena_->allocate(n); });  // throws the budget error with its advice
  TORCH_INTERNAL_ASSERT(false, "unreachable");
}

at::Tensor HostTier::wrap_host_block_empty(const at::Tensor& src, const std::vector<int64_t>& strides) {
  return at::for_blob(nullptr, src.sizes())
      .strides(strides)
      .options(at::TensorOptions().dtype(src.scalar_type()).device(at::kCPU))
      .make_tensor();
}

Pending HostTier::start_copy(const at::Tensor& dst, const at::Tensor& src) {
  check_open();
  TORCH_CHECK_VALUE(dst.sizes() == src.sizes(), "lohan copy: sizes differ: ", dst.sizes(), " vs ", src.sizes());
  TORCH_CHECK_VALUE(dst.scalar_type() == src.scalar_type(), "lohan copy: dtypes differ: ", dst.scalar_type(),
                    " vs ", src.scalar_type(), " (the copy engine does not convert)");
  TORCH_CHECK_VALUE(dst.layout() == c10::kStrided && src.layout() == c10::kStrided,
                    "lohan copy: only dense (strided) tensors");
  settle(dst);
  settle(src);
  release_deferred(false);
  Pending p;
  p.dir = direction(dst, src);
  p.keep = {src, dst};
  if (dst.is_cuda() || src.is_cuda()) {
    start_cuda_copy(p, dst, src);
    return p;
  }
  TORCH_CHECK_VALUE(dst.is_cpu() && src.is_cpu(), "lohan copy: CPU and CUDA tensors only, got ", dst.device(),
                    " and ", src.device());
  const uint64_t n = nbytes_of(src);
  SsdTokenCtx* sdst = ssd_ctx(dst);
  SsdTokenCtx* ssrc = ssd_ctx(src);
  TORCH_CHECK_VALUE(!(sdst && ssrc), "lohan copy: SSD to SSD copies are not supported");
  if (sdst || ssrc) {
    const at::Tensor& token = sdst ? dst : src;
    const at::Tensor& mem = sdst ? src : dst;
    SsdBlock& b = *(sdst ? sdst : ssrc)->block;
    TORCH_CHECK_VALUE(token.storage_offset() == 0 && n == b.nbytes(),
                      "lohan copy: an SSD block is copied whole; this tensor covers ", n, " of its ",
                      b.nbytes(), " bytes");
    TORCH_CHECK_VALUE(mem.strides() == token.strides() && mem.is_non_overlapping_and_dense(),
                      "lohan copy: the tensor copied to or from an SSD block needs the block's layout "
                      "(strides ",
                      token.strides(), "), got ", mem.strides(), "; use .contiguous() or a matching buffer");
    // Only the bytes the tensor spans are guaranteed readable/writable, except
    // in a host block (padded to its granule, so direct I/O can use it in place).
    HostBlockCtx* hc = host_ctx(mem);
    uint64_t capacity = n;
    if (hc && mem.storage_offset() == 0 && mem.data_ptr() == hc->ptr) capacity = arena_->block_size(hc->ptr);
    auto sp = sdst ? sdst->block : ssrc->block;
    p.cpu = guarded([&] {
      return sdst ? ssd_->write(sp, mem.const_data_ptr(), capacity, p.dir)
                  : ssd_->read(sp, mem.data_ptr(), capacity, p.dir);
    });
    return p;
  }
  TORCH_CHECK(src.data_ptr() != nullptr || n == 0, "lohan copy: the source has no memory");
  if (dst.strides() == src.strides() && src.is_non_overlapping_and_dense()) {
    p.cpu = guarded([&] { return engine_->copy(dst.data_ptr(), src.const_data_ptr(), n, p.dir); });
  } else {
    TORCH_CHECK_VALUE(dst.is_contiguous(),
                      "lohan copy: the destination must be contiguous or have the source's layout");
    std::vector<int64_t> bstrides;
    for (int64_t s : src.strides()) bstrides.push_back(s * src.element_size());
    p.cpu = guarded([&] {
      return engine_->gather(dst.data_ptr(), src.const_data_ptr(), src.sizes().vec(), bstrides,
                             static_cast<uint64_t>(src.element_size()), p.dir);
    });
  }
  return p;
}

c10::intrusive_ptr<CopyEvent> HostTier::copy(at::Tensor dst, at::Tensor src) {
  uint64_t n = nbytes_of(src);
  return c10::make_intrusive<CopyEvent>(start_copy(dst, src), n);
}

at::Tensor HostTier::swap_out(const at::Tensor& src) {
  check_open();
  settle(src);
  at::Tensor host;
  if (src.is_cuda()) {
    TORCH_CHECK(arena_->options().pin,
                "lohan swap_out: this HostTier is not pinned; create it with pin=True on a CUDA machine");
    host = host_like(src, /*allow_ssd=*/false);  // SSD spill of CUDA tensors: not implemented yet
  } else {
    bool dense = src.is_non_overlapping_and_dense();
    host = host_like(src, /*allow_ssd=*/true);
    if (!dense && ssd_ctx(host)) {
      // A non-dense source goes to SSD through a gathered copy made here,
      // on the step thread (device-tier memory, freed by the wait).
      Pending p = start_copy(host, src.contiguous());
      p.keep.push_back(src);
      register_pending(host, std::move(p));
      return host;
    }
  }
  register_pending(host, start_copy(host, src));
  return host;
}

at::Tensor HostTier::swap_in(const at::Tensor& host, std::optional<c10::Device> device) {
  check_open();
  settle(host);
  c10::Device dev = device.value_or(c10::Device(c10::kCPU));
  TORCH_CHECK_VALUE(host.is_cpu(), "lohan swap_in: expected a host (cpu) tensor, got one on ", host.device());
  // Device-tier memory, allocated on the calling thread (the step thread).
  at::Tensor dst = at::empty_strided(host.sizes(), dense_strides(host),
                                     host.options().device(dev));
  register_pending(dst, start_copy(dst, host));
  return dst;
}

std::string HostTier::location(const at::Tensor& t) {
  if (ssd_ctx(t)) return "ssd";
  if (host_ctx(t)) return "host";
  return t.is_cpu() ? "device" : t.device().str();
}

c10::Dict<std::string, int64_t> HostTier::stats() {
  auto s = arena_->stats();
  c10::Dict<std::string, int64_t> d;
  d.insert("in_use_bytes", as_i64(s.in_use_bytes));
  d.insert("staging_in_use_bytes", as_i64(staging_in_use_->load()));
  d.insert("requested_bytes", as_i64(s.requested_bytes));
  d.insert("peak_in_use_bytes", as_i64(s.peak_in_use_bytes));
  d.insert("reserved_bytes", as_i64(s.reserved_bytes));
  d.insert("peak_reserved_bytes", as_i64(s.peak_reserved_bytes));
  d.insert("free_bytes", as_i64(s.free_bytes));
  d.insert("largest_free_bytes", as_i64(s.largest_free_bytes));
  d.insert("free_blocks", as_i64(s.free_blocks));
  d.insert("live_blocks", as_i64(s.live_blocks));
  d.insert("arenas", as_i64(s.arenas));
  d.insert("pinned_bytes", as_i64(s.pinned_bytes));
  d.insert("allocs", as_i64(s.allocs));
  d.insert("frees", as_i64(s.frees));
  d.insert("failed_allocs", as_i64(s.failed_allocs));
  d.insert("budget_bytes", as_i64(s.budget_bytes));
  d.insert("alignment", as_i64(s.alignment));
  auto& c = engine_->counters();
  d.insert("copy_d2h_bytes", as_i64(c.d2h.load()));
  d.insert("copy_h2d_bytes", as_i64(c.h2d.load()));
  d.insert("copy_other_bytes", as_i64(c.other.load()));
  if (ssd_) {
    auto ss = ssd_->stats();
    d.insert("ssd_in_use_bytes", as_i64(ss.in_use_bytes));
    d.insert("ssd_peak_in_use_bytes", as_i64(ss.peak_in_use_bytes));
    d.insert("ssd_file_bytes", as_i64(ss.file_bytes));
    d.insert("ssd_live_blocks", as_i64(ss.live_blocks));
    d.insert("ssd_writes", as_i64(ss.writes));
    d.insert("ssd_reads", as_i64(ss.reads));
    d.insert("ssd_bytes_written", as_i64(ss.bytes_written));
    d.insert("ssd_bytes_read", as_i64(ss.bytes_read));
    d.insert("ssd_failed_ios", as_i64(ss.failed_ios));
    d.insert("ssd_staging_bytes", as_i64(ss.staging_bytes));
  }
  return d;
}

c10::Dict<std::string, std::string> HostTier::ssd_info() {
  c10::Dict<std::string, std::string> d;
  if (!ssd_) return d;
  d.insert("folder", ssd_->folder());
  std::string folders;
  for (const auto& f : ssd_->folders()) folders += (folders.empty() ? "" : "\n") + f;
  d.insert("folders", folders);
  d.insert("direct_io", ssd_->direct_io() ? "1" : "0");
  d.insert("io_mode", ssd_->io_mode());
  std::string files;
  for (const auto& f : ssd_->file_paths()) files += (files.empty() ? "" : "\n") + f;
  d.insert("files", files);
  d.insert("chunk_bytes", std::to_string(ssd_->options().chunk_bytes));
  d.insert("threads", std::to_string(ssd_->options().threads));
  return d;
}

std::vector<int64_t> HostTier::ssd_extent(const at::Tensor& t) {
  SsdTokenCtx* c = ssd_ctx(t);
  TORCH_CHECK_VALUE(c, "lohan host tier: not an SSD-resident tensor");
  return {c->block->file(), static_cast<int64_t>(c->block->offset()),
          static_cast<int64_t>(c->block->parts()[0].bytes)};
}

double HostTier::bench_alloc(int64_t nbytes, int64_t count, bool c10) {
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < count; ++i) {
    at::Tensor t = c10 ? at::empty({nbytes}, at::TensorOptions().dtype(at::kByte)) : alloc(nbytes);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void HostTier::reset_peak() { arena_->reset_peak(); }

int64_t HostTier::trim() { return static_cast<int64_t>(arena_->trim()); }

void HostTier::set_budget(int64_t b) { arena_->set_budget(b < 0 ? UINT64_MAX : static_cast<uint64_t>(b)); }

void HostTier::set_spill_reserve(int64_t b) {
  TORCH_CHECK_VALUE(b >= 0, "lohan host tier: a negative spill reserve");
  spill_reserve_.store(static_cast<uint64_t>(b));
}

int64_t HostTier::spill_reserve() { return static_cast<int64_t>(spill_reserve_.load()); }

void HostTier::check() {
  try {
    arena_->check();
    if (ssd_) ssd_->check();
  } catch (const std::logic_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

int64_t HostTier::copy_threads() { return engine_->threads(); }

bool HostTier::pinned() { return arena_->options().pin; }

bool HostTier::has_ssd() { return ssd_ != nullptr; }

bool HostTier::closed() { return closed_; }

void HostTier::close() {
  std::lock_guard<std::mutex> g(close_m_);
  if (closed_) return;
  closed_ = true;
  engine_->shutdown();
  if (ssd_) ssd_->close();
}

void HostTier::set_current(std::optional<c10::intrusive_ptr<HostTier>> tier) {
  std::lock_guard<std::mutex> g(g_current_m);
  g_current = tier ? *tier : c10::intrusive_ptr<HostTier>();
}

c10::intrusive_ptr<HostTier> HostTier::current() {
  std::lock_guard<std::mutex> g(g_current_m);
  if (!g_current) g_current = make_default();
  return g_current;
}

std::optional<c10::intrusive_ptr<HostTier>> HostTier::current_if_set() {
  std::lock_guard<std::mutex> g(g_current_m);
  if (!g_current) return std::nullopt;
  return g_current;
}

void HostTier::check_open() {
  TORCH_CHECK_VALUE(!closed_, "lohan host tier: this HostTier was closed; create a new one");
}

Direction HostTier::direction(const at::Tensor& dst, const at::Tensor& src) {
  bool dh = is_host_tier(dst), sh = is_host_tier(src);
  if (dst.is_cuda() != src.is_cuda()) return dst.is_cuda() ? Direction::H2D : Direction::D2H;
  if (dh && !sh) return Direction::D2H;
  if (sh && !dh) return Direction::H2D;
  return Direction::Other;
}

// CUDA: the copy runs on a side stream (one per direction and device) that
// first waits for the current stream, so it sees src fully written and dst
// no longer in use by earlier kernels. Keepalives (not record_stream) hold
// src and dst until the wait, which avoids the caching allocator's
// fragmentation from cross-stream frees.
void HostTier::start_cuda_copy(Pending& p, const at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK_VALUE(!ssd_ctx(dst) && !ssd_ctx(src),
                    "lohan copy: SSD blocks do not take part in CUDA copies yet (stage through host memory)");
  c10::Device dev = dst.is_cuda() ? dst.device() : src.device();
  c10::impl::VirtualGuardImpl impl(dev.type());
  c10::Stream cur = impl.getStream(dev);
  c10::Stream side = side_stream(dev, p.dir == Direction::H2D);
  c10::Event ready(dev.type());
  ready.record(cur);
  ready.block(side);
  {
    c10::StreamGuard guard(side);
    at::Tensor d = dst;
    d.copy_(src, /*non_blocking=*/true);
  }
  p.dev = std::make_shared<c10::Event>(dev.type());
  p.dev->record(side);
  p.device = dev;
  p.host_sync = !dst.is_cuda();  // the host reads what lands in host memory
  p.dev_bytes = nbytes_of(src);
}

c10::Stream HostTier::side_stream(c10::Device dev, bool h2d) {
  std::lock_guard<std::mutex> g(streams_m_);
  auto key = std::make_pair(static_cast<int>(dev.index()), h2d);
  auto it = streams_.find(key);
  if (it != streams_.end()) return it->second;
  c10::impl::VirtualGuardImpl impl(dev.type());
  c10::Stream s = impl.getStreamFromGlobalPool(dev, /*isHighPriority=*/false);
  streams_.emplace(key, s);
  return s;
}

// ---- the ops' kernels ----------------------------------------------------------------

namespace tier {

at::Tensor swap_out_op(const at::Tensor& src) { return HostTier::current()->swap_out(src); }

at::Tensor swap_in_op(const at::Tensor& host, std::optional<c10::Device> device) {
  return HostTier::current()->swap_in(host, device);
}

at::Tensor wait_tensor_op(const at::Tensor& t) {
  release_deferred(false);
  if (auto p = take_pending(t)) finish(*p);  // keepalives die here, on the calling thread
  // Tensor(a) -> Tensor(a): a new tensor over the same storage (an operator
  // below autograd may not return its input object itself).
  return t.alias();
}

int64_t drain_op() {
  std::unordered_map<const c10::StorageImpl*, Pending> all;
  {
    std::lock_guard<std::mutex> g(g_pending_m);
    all.swap(g_pending);
  }
  int64_t n = static_cast<int64_t>(all.size());
  std::string first_error;
  for (auto& [k, p] : all) {
    try {
      finish(p);
    } catch (const std::exception& e) {
      if (first_error.empty()) first_error = e.what();
    }
  }
  all.clear();
  release_deferred(true);
  TORCH_CHECK(first_error.empty(), first_error);
  return n;
}

int64_t pending_op() {
  std::lock_guard<std::mutex> g(g_pending_m);
  return static_cast<int64_t>(g_pending.size());
}

std::vector<int64_t> bytes_moved_op() {
  auto& c = host::global_counters();
  return {static_cast<int64_t>(c.d2h.load()), static_cast<int64_t>(c.h2d.load()),
          static_cast<int64_t>(c.ssd_write.load()), static_cast<int64_t>(c.ssd_read.load())};
}

void copy_timeline_record_op(bool on) { host::set_timeline_recording(on); }

std::vector<int64_t> copy_timeline_take_op() {
  std::vector<int64_t> out;
  for (const auto& s : host::take_timeline()) {
    out.push_back(static_cast<int64_t>(s.kind));
    out.push_back(static_cast<int64_t>(s.bytes));
    out.push_back(s.start_ns);
    out.push_back(s.end_ns);
  }
  return out;
}

int64_t cleanup_stale_op(std::string dir) {
  return guarded([&] { return static_cast<int64_t>(SsdTier::cleanup_stale(dir)); });
}

}  // namespace tier
}  // namespace lohan
