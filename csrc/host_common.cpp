#include "host_common.h"

#include <sys/mman.h>

#include <cstdio>
#include <cstring>

namespace lohan {
namespace host {

std::string errno_text(int err) {
  char buf[256];
  // GNU strerror_r may return a static string instead of filling buf.
  const char* s = strerror_r(err, buf, sizeof buf);
  return std::string(s) + " (errno " + std::to_string(err) + ")";
}

std::string format_bytes(uint64_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char buf[64];
  if (u == 0)
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(n));
  else
    std::snprintf(buf, sizeof buf, "%.2f %s", v, units[u]);
  return buf;
}

void* map_memory(uint64_t size, bool touch) {
  constexpr uint64_t kHuge = 2ull << 20;
  bool huge = size >= kHuge;
  uint64_t map_size = huge ? size + kHuge : size;
  void* m = mmap(nullptr, map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  char* base = static_cast<char*>(m);
  if (huge) {
    // keep the 2 MiB-aligned part so that the kernel can back it with huge pages
    char* aligned = reinterpret_cast<char*>(round_up(reinterpret_cast<uintptr_t>(base), kHuge));
    if (aligned > base) munmap(base, aligned - base);
    char* end = aligned + size;
    if (base + map_size > end) munmap(end, base + map_size - end);
    base = aligned;
    madvise(base, size, MADV_HUGEPAGE);  // advisory: failure only costs speed
  }
  if (touch) std::memset(base, 0, size);
  return base;
}

}  // namespace host
}  // namespace lohan
