// lohan::fingerprint — a 64-bit fingerprint of a tensor's bytes.
//
// The SSD tier stores it beside each block and refuses a block whose bytes no
// longer match (a half-written or corrupted file is never read back as valid).
// Four independent lanes keep the multiplier units busy; the result does not
// depend on threads or alignment. The algorithm (documented in
// lohan_compile/ext.py, with a pure-Python reference in the tests) is:
//   lanes start at seed_i; every 32-byte block updates lane i with word i:
//     lane = rotl(lane ^ (word * K1), 27) * K2
//   the tail (< 32 bytes) is zero-padded to a block; then
//   h = length * K3 ^ lane0 ^ rotl(lane1, 16) ^ rotl(lane2, 32) ^ rotl(lane3, 48)
//   and h is finalized by the splitmix64 mixer.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "fingerprint.h"

namespace lohan {
namespace {

at::Tensor fingerprint_cpu(const at::Tensor& self) {
  TORCH_CHECK(self.is_contiguous(),
              "lohan::fingerprint needs a contiguous tensor; call .contiguous() first");
  TORCH_CHECK(self.layout() == c10::kStrided,
              "lohan::fingerprint needs a dense (strided) tensor, got ", self.layout());
  const uint64_t n = static_cast<uint64_t>(self.numel()) * self.element_size();
  const auto* p = static_cast<const unsigned char*>(self.const_data_ptr());
  uint64_t h = fingerprint_bytes(p, n);
  at::Tensor out = at::empty({}, self.options().dtype(at::kLong));
  int64_t signed_h;
  std::memcpy(&signed_h, &h, sizeof h);  // same bits, as torch has no uint64 arithmetic
  out.fill_(signed_h);
  return out;
}

}  // namespace

// Every file registers a fragment of the lohan namespace, so files can be added freely.
TORCH_LIBRARY_FRAGMENT(lohan, m) {
  m.def("fingerprint(Tensor self) -> Tensor");
}

TORCH_LIBRARY_IMPL(lohan, CPU, m) {
  m.impl("fingerprint", &fingerprint_cpu);
}

}  // namespace lohan
