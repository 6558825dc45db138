// The 64-bit fingerprint of a byte range (see fingerprint.cpp for the algorithm).
// Header-only and torch-free: the SSD tier checksums its blocks with it.

#pragma once

#include <cstdint>
#include <cstring>

namespace lohan {
namespace fp_detail {

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

}  // namespace fp_detail

inline uint64_t fingerprint_bytes(const unsigned char* p, uint64_t n) {
  using namespace fp_detail;
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

// fingerprint_bytes(src, n), computed while copying src to dst in the same
// pass (the SSD tier's staging copies: one read of the data instead of two).
inline uint64_t fingerprint_copy(unsigned char* dst, const unsigned char* src, uint64_t n) {
  using namespace fp_detail;
  uint64_t lane[4] = {SEEDS[0], SEEDS[1], SEEDS[2], SEEDS[3]};
  uint64_t full = n / 32;
  for (uint64_t b = 0; b < full; ++b, src += 32, dst += 32) {
    uint64_t w[4];
    std::memcpy(w, src, 32);
    std::memcpy(dst, w, 32);
    for (int i = 0; i < 4; ++i) lane[i] = round_(lane[i], w[i]);
  }
  uint64_t rest = n % 32;
  if (rest != 0) {
    uint64_t w[4] = {0, 0, 0, 0};
    std::memcpy(w, src, rest);
    std::memcpy(dst, src, rest);
    for (int i = 0; i < 4; ++i) lane[i] = round_(lane[i], w[i]);
  }
  uint64_t h = (n * K3) ^ lane[0] ^ rotl(lane[1], 16) ^ rotl(lane[2], 32) ^ rotl(lane[3], 48);
  return finalize(h);
}

}  // namespace lohan
