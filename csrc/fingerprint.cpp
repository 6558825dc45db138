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

namespace lohan {
namespace {

constexpr uint64_t K1 = 0x9E3779B97F4A7C15ull;
constexpr uint64_t K2 = 0xC2B2AE3D27D4EB4Full;
constexpr uint64_t K3 = 0x165667B19E3779F9ull;
constexpr uint64_t SEEDS[4] = {0x243F6A8885A308D3ull, 0x13198A2E03707344ull,
                               0xA4093822299F31D0ull, 0x082EFA98EC4E6C89ull};

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

inline uint64_t round_(uint64_t lane, uint64_t word) {
  return rotl(lane ^ (word * K1), 27) * K2;
}

inline uint64_t finalize(uint64_t h) {
  h ^= h >> 30;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 27;
  h *= 0x94D049BB133111EBull;
  h ^= h >> 31;
  return h;
}

uint64_t fingerprint_bytes(const unsigned char* p, uint64_t n) {
  uint64_t lane[4] = {SEEDS[0], SEEDS[1], SEEDS[2], SEEDS[3]};
  uint64_t full = n / 32;
  for (uint64_t b = 0; b < full; ++b, p += 32) {
    uint64_t w[4];
    std::memcpy(w, p, 32);  // unaligned-safe; compiles to plain loads
    for (int i = 0; i < 4; ++i) lane[i] = round_(lane[i], w[i]);
  }
  uint64_t rest = n % 32;
  if (rest != 0) {
    uint64_t w[4] = {0, 0, 0, 0};
    std::memcpy(w, p, rest);
    for (int i = 0; i < 4; ++i) lane[i] = round_(lane[i], w[i]);
  }
  uint64_t h = (n * K3) ^ lane[0] ^ rotl(lane[1], 16) ^ rotl(lane[2], 32) ^ rotl(lane[3], 48);
  return finalize(h);
}

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
