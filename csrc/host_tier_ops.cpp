// Registration of the host tier: the torch classes lohan.HostTier and
// lohan.CopyEvent, the graph ops swap_out / swap_in / wait_tensor and the
// runtime helpers. What they do is in host_tier.h / host_tier.cpp.

#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "host_tier.h"

namespace lohan {

TORCH_LIBRARY_FRAGMENT(lohan, m) {
  m.class_<CopyEvent>("CopyEvent")
      .def("wait", &CopyEvent::wait)
      .def("query", &CopyEvent::query)
      .def("nbytes", &CopyEvent::nbytes);

  m.class_<HostTier>("HostTier")
      .def(torch::init<int64_t, int64_t, int64_t, bool, int64_t, int64_t, std::vector<std::string>, int64_t, int64_t,
                       int64_t, int64_t, bool>())
      .def("alloc", &HostTier::alloc)
      .def("alloc_ssd", &HostTier::alloc_ssd)
      .def("empty_strided", &HostTier::empty_strided)
      .def("copy", &HostTier::copy)
      .def("swap_out", &HostTier::swap_out)
      .def("swap_in", &HostTier::swap_in)
      .def("location", &HostTier::location)
      .def("stats", &HostTier::stats)
      .def("ssd_info", &HostTier::ssd_info)
      .def("ssd_extent", &HostTier::ssd_extent)
      .def("bench_alloc", &HostTier::bench_alloc)
      .def("reset_peak", &HostTier::reset_peak)
      .def("trim", &HostTier::trim)
      .def("set_budget", &HostTier::set_budget)
      .def("set_spill_reserve", &HostTier::set_spill_reserve)
      .def("spill_reserve", &HostTier::spill_reserve)
      .def("check", &HostTier::check)
      .def("copy_threads", &HostTier::copy_threads)
      .def("pinned", &HostTier::pinned)
      .def("has_ssd", &HostTier::has_ssd)
      .def("closed", &HostTier::closed)
      .def("close", &HostTier::close)
      .def_static("set_current", &HostTier::set_current)
      .def_static("current", &HostTier::current)
      .def_static("current_if_set", &HostTier::current_if_set);

  // The graph interface. Waits return the tensor they guard, so ordering is a
  // data edge; all three are marked side-effecting in Python (ops.py) so that
  // dead-code elimination keeps them.
  m.def("swap_out(Tensor src) -> Tensor");
  m.def("swap_in(Tensor host, Device? device=None) -> Tensor");
  m.def("wait_tensor(Tensor(a) t) -> Tensor(a)");
  // Runtime helpers (not for graphs).
  m.def("_host_tier_drain() -> int");
  m.def("_host_tier_pending() -> int");
  m.def("_host_tier_bytes_moved() -> int[]");
  m.def("_copy_timeline_record(bool on) -> ()");
  m.def("_copy_timeline_take() -> int[]");
  m.def("_ssd_cleanup_stale(str dir) -> int");
}

TORCH_LIBRARY_IMPL(lohan, CPU, m) {
  m.impl("swap_out", &tier::swap_out_op);
  m.impl("swap_in", &tier::swap_in_op);
  m.impl("wait_tensor", &tier::wait_tensor_op);
}

TORCH_LIBRARY_IMPL(lohan, CUDA, m) {
  m.impl("swap_out", &tier::swap_out_op);
  m.impl("wait_tensor", &tier::wait_tensor_op);
}

TORCH_LIBRARY_IMPL(lohan, CompositeExplicitAutograd, m) {
  m.impl("_host_tier_drain", &tier::drain_op);
  m.impl("_host_tier_pending", &tier::pending_op);
  m.impl("_host_tier_bytes_moved", &tier::bytes_moved_op);
  m.impl("_copy_timeline_record", &tier::copy_timeline_record_op);
  m.impl("_copy_timeline_take", &tier::copy_timeline_take_op);
  m.impl("_ssd_cleanup_stale", &tier::cleanup_stale_op);
}

}  // namespace lohan
