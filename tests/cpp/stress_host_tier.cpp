// Multithreaded stress test of the host tier's C++ core (arena, copy engine,
// SSD tier), without torch or Python, so that it runs under ASan/UBSan and
// TSan (scripts/sanitize.sh). Every byte moved is checked; the books must
// balance at the end; the SSD folder must be gone after close().
//
// usage: stress_host_tier <scratch folder> [rounds]

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "copy_engine.h"
#include "host_arena.h"
#include "ssd_tier.h"

using namespace lohan::host;

namespace {

std::atomic<int> failures{0};

#define EXPECT(cond, ...)                                 \
  do {                                                    \
    if (!(cond)) {                                        \
      std::fprintf(stderr, "FAILED %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                  \
      std::fprintf(stderr, "\n");                         \
      failures.fetch_add(1);                              \
    }                                                     \
  } while (0)

void fill(char* p, uint64_t n, uint64_t seed) {
  std::mt19937_64 g(seed);
  for (uint64_t i = 0; i < n; ++i) p[i] = static_cast<char>(g());
}

bool same(const char* a, const char* b, uint64_t n) { return std::memcmp(a, b, n) == 0; }

uint64_t pick_size(std::mt19937_64& g) {
  static const uint64_t sizes[] = {1, 100, 4095, 4096, 4097, 20000, 65536 + 3, 300000};
  return sizes[g() % (sizeof sizes / sizeof sizes[0])];
}

// Threads allocating, filling, checking and freeing blocks of one arena.
void arena_worker(HostArena& arena, int id, int rounds) {
  std::mt19937_64 g(1000 + id);
  struct Live {
    char* p;
    uint64_t n;
    uint64_t seed;
  };
  std::vector<Live> live;
  for (int r = 0; r < rounds; ++r) {
    if (live.empty() || g() % 100 < 55) {
      uint64_t n = pick_size(g);
      char* p = static_cast<char*>(arena.try_allocate(n));
      if (!p) continue;  // over budget: fine, others hold it
      EXPECT(reinterpret_cast<uintptr_t>(p) % 4096 == 0, "misaligned block");
      uint64_t seed = g();
      fill(p, n, seed);
      live.push_back({p, n, seed});
    } else {
      size_t k = g() % live.size();
      Live l = live[k];
      live.erase(live.begin() + static_cast<long>(k));
      std::vector<char> want(l.n);
      fill(want.data(), l.n, l.seed);
      EXPECT(same(l.p, want.data(), l.n), "arena block overwritten by another thread");
      arena.free(l.p);
    }
    if (r % 64 == 0) arena.check();
  }
  for (auto& l : live) arena.free(l.p);
}

// Threads copying through one engine: contiguous copies and strided gathers.
void copy_worker(CopyEngine& engine, HostArena& arena, int id, int rounds) {
  std::mt19937_64 g(2000 + id);
  for (int r = 0; r < rounds; ++r) {
    uint64_t n = pick_size(g);
    std::vector<char> src(n);
    fill(src.data(), n, g());
    char* dst = static_cast<char*>(arena.allocate(n));
    auto done = engine.copy(dst, src.data(), n, Direction::D2H);
    done->wait();
    EXPECT(same(dst, src.data(), n), "copy mismatch (%llu bytes)", static_cast<unsigned long long>(n));
    // a transposed 2-D float array, gathered into row-major order
    const int64_t rows = 37, cols = 1 + static_cast<int64_t>(g() % 300);
    std::vector<float> m(static_cast<size_t>(rows * cols));
    for (size_t i = 0; i < m.size(); ++i) m[i] = static_cast<float>(g() % 1000);
    std::vector<float> t(m.size(), -1.f);
    auto gd = engine.gather(t.data(), m.data(), {cols, rows}, {4, 4 * cols}, 4, Direction::H2D);
    gd->wait();
    bool ok = true;
    for (int64_t i = 0; i < cols && ok; ++i)
      for (int64_t j = 0; j < rows; ++j)
        if (t[static_cast<size_t>(i * rows + j)] != m[static_cast<size_t>(j * cols + i)]) ok = false;
    EXPECT(ok, "gather mismatch");
    arena.free(dst);
  }
}

// Threads writing blocks to SSD and reading them back, aligned and not.
void ssd_worker(SsdTier& ssd, HostArena& arena, int id, int rounds) {
  std::mt19937_64 g(3000 + id);
  for (int r = 0; r < rounds; ++r) {
    uint64_t n = pick_size(g);
    bool aligned = g() % 2;
    std::vector<char> unaligned(n + 1);
    char* src = aligned ? static_cast<char*>(arena.allocate(n)) : unaligned.data() + 1;
    uint64_t cap = aligned ? round_up(n, 4096) : n;
    fill(src, n, g());
    auto block = ssd.allocate(n);
    try {
      ssd.read(block, src, cap, Direction::Other);
      EXPECT(false, "read of an unwritten block was accepted");
    } catch (const Error&) {
    }
    ssd.write(block, src, cap, Direction::D2H)->wait();
    std::vector<char> back_buf(n + 7);
    char* back = back_buf.data() + 7;
    ssd.read(block, back, n, Direction::H2D)->wait();
    EXPECT(same(back, src, n), "SSD round trip mismatch (%llu bytes, %s source)",
           static_cast<unsigned long long>(n), aligned ? "aligned" : "unaligned");
    if (aligned) arena.free(src);
  }
}

bool folder_exists(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s <scratch folder> [rounds]\n", argv[0]);
    return 2;
  }
  std::string dir = argv[1];
  int rounds = argc > 2 ? std::atoi(argv[2]) : 300;

  HostArenaOptions ao;
  ao.budget = 4ull << 20;
  ao.arena_bytes = 1ull << 20;
  HostArena arena(ao);
  HostArenaOptions io_opts;  // the copy and SSD threads' buffers: no budget, so they never wait
  io_opts.arena_bytes = 1ull << 20;
  HostArena io_arena(io_opts);
  CopyEngine engine(2, 16 << 10);
  SsdOptions so;
  so.dir = dir;
  so.files = 2;
  so.threads = 3;
  so.chunk_bytes = 64 << 10;
  auto ssd = SsdTier::create(so);
  std::string folder = ssd->folder();
  std::printf("ssd: %s, %s\n", folder.c_str(), ssd->io_mode().c_str());

  std::vector<std::thread> threads;
  for (int i = 0; i < 3; ++i) threads.emplace_back(arena_worker, std::ref(arena), i, rounds);
  for (int i = 0; i < 2; ++i) threads.emplace_back(copy_worker, std::ref(engine), std::ref(io_arena), i, rounds / 3);
  for (int i = 0; i < 3; ++i) threads.emplace_back(ssd_worker, std::ref(*ssd), std::ref(io_arena), i, rounds / 3);
  for (auto& t : threads) t.join();

  arena.check();
  io_arena.check();
  ssd->check();
  EXPECT(io_arena.stats().in_use_bytes == 0, "I/O buffers leaked");
  auto s = arena.stats();
  EXPECT(s.in_use_bytes == 0 && s.live_blocks == 0, "arena blocks leaked");
  EXPECT(s.reserved_bytes <= ao.budget, "budget exceeded");
  auto ss = ssd->stats();
  EXPECT(ss.in_use_bytes == 0 && ss.live_blocks == 0, "SSD blocks leaked");
  EXPECT(ss.failed_ios == 0, "SSD I/O failed");
  std::printf("arena: %llu allocs, %llu refused by the budget; copies: %llu bytes; ssd: %llu writes, %llu reads\n",
              static_cast<unsigned long long>(s.allocs), static_cast<unsigned long long>(s.failed_allocs),
              static_cast<unsigned long long>(engine.counters().d2h + engine.counters().h2d),
              static_cast<unsigned long long>(ss.writes), static_cast<unsigned long long>(ss.reads));

  // a second tier in the same folder, while the first lives; then both close
  auto other = SsdTier::create(so);
  EXPECT(folder_exists(folder), "a new tier removed a live tier's folder");
  other->close();
  ssd->close();
  EXPECT(!folder_exists(folder), "close() left the private folder behind");
  engine.shutdown();

  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures.load());
    return 1;
  }
  std::printf("stress test passed\n");
  return 0;
}
