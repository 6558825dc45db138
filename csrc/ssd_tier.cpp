#include "ssd_tier.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>

#include "fingerprint.h"

namespace lohan {
namespace host {
namespace {

constexpr uint64_t kAlign = 4096;
constexpr const char* kDirLock = ".lohan-ssd.lock";
constexpr const char* kPrefix = "lohan-ssd-";
constexpr const char* kOwnLock = "lock";

[[noreturn]] void storage_error(const std::string& msg, int err) {
  throw Error(ErrorKind::Storage, "lohan SSD tier: " + msg, err);
}

std::string advice_for(int err) {
  switch (err) {
    case ENOSPC:
    case EDQUOT:
      return "Free space on the disk that holds ssd_dir, point ssd_dir at a larger disk, "
             "or raise host_memory_budget so that fewer blocks spill.";
    case EFBIG:
      return "A file-size limit was reached (the shell's `ulimit -f`, i.e. RLIMIT_FSIZE, or the "
             "filesystem's maximum file size): raise the limit, or use more ssd files (ssd_files).";
    case EIO:
      return "The disk reported an I/O error: check it (dmesg, smartctl) or use another ssd_dir.";
    case EROFS:
    case EACCES:
    case EPERM:
      return "Choose an ssd_dir on a filesystem this process can write to.";
    default:
      return "Check the disk that holds ssd_dir, or choose another ssd_dir.";
  }
}

// 16 random bytes as hex: folder names nobody can guess in advance.
std::string random_hex() {
  unsigned char b[16];
  size_t got = 0;
  while (got < sizeof b) {
    ssize_t r = getrandom(b + got, sizeof b - got, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      storage_error("could not get random bytes for a private folder name: " + errno_text(errno), errno);
    }
    got += static_cast<size_t>(r);
  }
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (unsigned char c : b) {
    s += hex[c >> 4];
    s += hex[c & 15];
  }
  return s;
}

// Holds ssd_dir's lock file, exclusively, for one creation or cleanup.
class DirLock {
 public:
  DirLock(int dirfd, const std::string& dir) {
    fd_ = openat(dirfd, kDirLock, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd_ < 0) {
      int err = errno;
      storage_error("cannot write in ssd_dir '" + dir + "' (creating its lock file " + kDirLock +
                        "): " + errno_text(err) + ". " + advice_for(err),
                    err);
    }
    while (flock(fd_, LOCK_EX) != 0) {
      if (errno != EINTR) {
        int err = errno;
        ::close(fd_);
        storage_error("cannot lock ssd_dir '" + dir + "': " + errno_text(err), err);
      }
    }
  }
  ~DirLock() {
    if (fd_ >= 0) ::close(fd_);  // closing drops the flock
  }

 private:
  int fd_ = -1;
};

// Removes the regular files of a private folder, then the folder. Leaves a
// folder that holds anything else (it is then not ours to delete).
bool remove_folder(int dirfd, const std::string& name) {
  int fd = openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return false;
  DIR* d = fdopendir(fd);
  if (!d) {
    ::close(fd);
    return false;
  }
  std::vector<std::string> names;
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n == "." || n == "..") continue;
    names.push_back(n);
  }
  for (const auto& n : names) {
    struct stat st;
    if (fstatat(fd, n.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && !S_ISDIR(st.st_mode))
      unlinkat(fd, n.c_str(), 0);
  }
  closedir(d);  // closes fd
  return unlinkat(dirfd, name.c_str(), AT_REMOVEDIR) == 0;
}

int cleanup_locked(int dirfd) {
  int dfd = dup(dirfd);
  if (dfd < 0) return 0;
  DIR* d = fdopendir(dfd);
  if (!d) {
    ::close(dfd);
    return 0;
  }
  std::vector<std::string> candidates;
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n.rfind(kPrefix, 0) == 0) candidates.push_back(n);
  }
  closedir(d);
  int removed = 0;
  for (const auto& n : candidates) {
    struct stat st;
    if (fstatat(dirfd, n.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
    if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid()) continue;  // not a folder of ours
    int fd = openat(dirfd, n.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) continue;
    int lk = openat(fd, kOwnLock, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    ::close(fd);
    if (lk >= 0) {
      // A live run holds this lock for its whole life; the kernel released it if the run died.
      bool live = flock(lk, LOCK_EX | LOCK_NB) != 0;
      if (live) {
        ::close(lk);
        continue;
      }
    }
    // No lock file: its creator died between mkdir and creating it (under the dir lock).
    if (remove_folder(dirfd, n)) ++removed;
    if (lk >= 0) ::close(lk);
  }
  return removed;
}

void pwrite_full(int fd, const char* buf, uint64_t n, uint64_t off, const std::string& path) {
  uint64_t done = 0;
  while (done < n) {
    ssize_t r = pwrite(fd, buf + done, n - done, static_cast<off_t>(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      storage_error("writing " + format_bytes(n) + " to " + path + " at offset " + std::to_string(off) +
                        " failed: " + errno_text(err) + ". " + advice_for(err),
                    err);
    }
    if (r == 0)
      storage_error("writing to " + path + " at offset " + std::to_string(off + done) +
                        " made no progress (0 bytes written). " + advice_for(ENOSPC),
                    ENOSPC);
    done += static_cast<uint64_t>(r);
  }
}

void pread_full(int fd, char* buf, uint64_t n, uint64_t off, const std::string& path) {
  uint64_t done = 0;
  while (done < n) {
    ssize_t r = pread(fd, buf + done, n - done, static_cast<off_t>(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      storage_error("reading " + format_bytes(n) + " from " + path + " at offset " + std::to_string(off) +
                        " failed: " + errno_text(err) + ". " + advice_for(err),
                    err);
    }
    if (r == 0)
      storage_error("short read: " + path + " ended at offset " + std::to_string(off + done) + ", " +
                        std::to_string(n - done) + " bytes before the end of the block (was the file "
                        "truncated or replaced by another program?). The block is refused.",
                    EIO);
    done += static_cast<uint64_t>(r);
  }
}

}  // namespace

// ---- blocks -----------------------------------------------------------------

SsdBlock::~SsdBlock() { tier_->release(*this); }

bool SsdBlock::valid() const {
  std::lock_guard<std::mutex> g(m_);
  return state_ == State::Valid;
}

// ---- creation and cleanup ---------------------------------------------------

int SsdTier::cleanup_stale(const std::string& dir) {
  int dirfd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dirfd < 0) {
    int err = errno;
    storage_error("cannot open ssd_dir '" + dir + "': " + errno_text(err), err);
  }
  int removed;
  try {
    DirLock lock(dirfd, dir);
    removed = cleanup_locked(dirfd);
  } catch (...) {
    ::close(dirfd);
    throw;
  }
  ::close(dirfd);
  return removed;
}

std::shared_ptr<SsdTier> SsdTier::create(const SsdOptions& opts) {
  if (opts.files < 1 || opts.threads < 1)
    throw Error(ErrorKind::Usage, "lohan SSD tier: ssd_files and ssd_threads must be at least 1");
  if (opts.chunk_bytes == 0 || opts.chunk_bytes % kAlign != 0)
    throw Error(ErrorKind::Usage, "lohan SSD tier: chunk_bytes must be a positive multiple of 4096");
  if (opts.dirs.empty()) throw Error(ErrorKind::Usage, "lohan SSD tier: no ssd_dir folder given");
  for (const std::string& dir : opts.dirs) {
    struct stat st;
    if (stat(dir.c_str(), &st) != 0) {
      int err = errno;
      if (err == ENOENT)
        storage_error("ssd_dir '" + dir + "' does not exist: create it first (mkdir -p " + dir +
                          ") or choose another folder.",
                      err);
      storage_error("cannot access ssd_dir '" + dir + "': " + errno_text(err) + ". " + advice_for(err), err);
    }
    if (!S_ISDIR(st.st_mode))
      storage_error("ssd_dir '" + dir + "' is not a folder (it is a file or a device): give the path of a folder.",
                    ENOTDIR);
  }
  std::shared_ptr<SsdTier> t(new SsdTier(opts));
  const int n = static_cast<int>(opts.dirs.size());
  // at least one data file per folder, and as many in each (file i lives in folder i % n)
  t->opts_.files = (std::max(opts.files, n) + n - 1) / n * n;
  t->dirs_ = opts.dirs;
  t->folders_.assign(opts.dirs.size(), "");
  t->lock_fds_.assign(opts.dirs.size(), -1);
  t->owner_pid_ = getpid();
  std::vector<int> folder_fds;
  try {
    for (size_t i = 0; i < opts.dirs.size(); ++i) {
      int dirfd = open(opts.dirs[i].c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (dirfd < 0) {
        int err = errno;
        storage_error("cannot open ssd_dir '" + opts.dirs[i] + "': " + errno_text(err), err);
      }
      try {
        t->make_folder(i, dirfd);
      } catch (...) {
        ::close(dirfd);
        throw;
      }
      int ffd = openat(dirfd, t->folders_[i].substr(opts.dirs[i].size() + 1).c_str(),
                       O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      int err = errno;
      ::close(dirfd);
      if (ffd < 0) storage_error("cannot open the private folder " + t->folders_[i] + ": " + errno_text(err), err);
      folder_fds.push_back(ffd);
    }
    t->open_files(folder_fds);
  } catch (...) {
    for (int fd : folder_fds) ::close(fd);
    t->close();  // removes whatever was created
    throw;
  }
  for (int fd : folder_fds) ::close(fd);
  t->start_threads();
  return t;
}

void SsdTier::make_folder(size_t i, int dirfd) {
  const std::string& dir = dirs_[i];
  DirLock lock(dirfd, dir);
  cleanup_locked(dirfd);
  std::string name = kPrefix + random_hex();
  if (mkdirat(dirfd, name.c_str(), 0700) != 0) {
    int err = errno;
    storage_error("cannot create a private folder in ssd_dir '" + dir + "': " + errno_text(err) + ". " +
                      advice_for(err),
                  err);
  }
  folders_[i] = dir + "/" + name;
  int ffd = openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (ffd < 0) {
    int err = errno;
    storage_error("cannot open the private folder " + folders_[i] + ": " + errno_text(err), err);
  }
  // (created and locked under the dir lock: a cleaner never sees this folder unlocked)
  lock_fds_[i] = openat(ffd, kOwnLock, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (lock_fds_[i] < 0 || flock(lock_fds_[i], LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    ::close(ffd);
    storage_error("cannot create the lock file in " + folders_[i] + ": " + errno_text(err), err);
  }
  ::close(ffd);
  std::string pid = std::to_string(getpid()) + "\n";
  if (::write(lock_fds_[i], pid.data(), pid.size()) < 0) { /* informational only */ }
}

void SsdTier::open_files(const std::vector<int>& folder_fds) {
  int flags = O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW;
  direct_ = opts_.direct != 0;
  std::string why;
  const size_t n = folders_.size();
  for (int i = 0; i < opts_.files; ++i) {
    const size_t f = static_cast<size_t>(i) % n;
    std::string name = "data-" + std::to_string(i);
    std::string path = folders_[f] + "/" + name;
    int fd = openat(folder_fds[f], name.c_str(), flags | (direct_ ? O_DIRECT : 0), 0600);
    if (fd < 0 && direct_ && errno == EINVAL) {
      why = "the filesystem of " + folders_[f] + " refused O_DIRECT when opening (EINVAL)";
      direct_ = false;
      unlinkat(folder_fds[f], name.c_str(), 0);  // the refused open may have created it already
      fd = openat(folder_fds[f], name.c_str(), flags, 0600);
    }
    if (fd < 0) {
      int err = errno;
      storage_error("cannot create " + path + ": " + errno_text(err) + ". " + advice_for(err), err);
    }
    paths_.push_back(path);
    fds_.push_back(fd);
  }
  if (direct_) {
    // Some filesystems accept O_DIRECT at open and refuse it at the first I/O: probe each folder
    // once (its first file, i < folders).
    void* probe = mmap(nullptr, kAlign, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (probe == MAP_FAILED) storage_error("cannot map a probe buffer: " + errno_text(errno), errno);
    for (size_t f = 0; f < n && direct_; ++f) {
      ssize_t r = pwrite(fds_[f], probe, kAlign, 0);
      int err = errno;
      if (r < 0 && err == EINVAL) {
        why = "the filesystem of " + folders_[f] + " accepted O_DIRECT but refused an aligned direct write (EINVAL)";
        direct_ = false;
      } else if (r < 0) {
        munmap(probe, kAlign);
        storage_error("cannot write to " + paths_[f] + ": " + errno_text(err) + ". " + advice_for(err), err);
      }
      if (ftruncate(fds_[f], 0) != 0) { /* the probe block is reused as space anyway */ }
    }
    munmap(probe, kAlign);
  }
  // buffered on every file once one folder refused direct I/O (files opened before it have
  // O_DIRECT set, which unaligned buffered I/O cannot use)
  if (!direct_)
    for (int fd : fds_) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_DIRECT);
  if (!direct_ && opts_.direct == 1)
    storage_error("direct I/O was required (direct_io=True) but " + why +
                      ". Use direct_io='auto' to fall back to buffered I/O.",
                  EINVAL);
  if (direct_)
    io_mode_ = "direct (O_DIRECT, bypasses the page cache)";
  else if (opts_.direct == 0)
    io_mode_ = "buffered (direct_io=False was asked for): reads may be served from the page cache";
  else
    io_mode_ = "buffered fallback: " + why + "; reads may be served from the page cache";
  for (int i = 0; i < opts_.files; ++i) ext_.add_region(static_cast<uint64_t>(i), 0);
}

void SsdTier::start_threads() {
  queues_.resize(static_cast<size_t>(opts_.files));
  try {
    for (int i = 0; i < opts_.threads; ++i) workers_.emplace_back([this, i] { run(i); });
  } catch (const std::system_error& e) {
    close();
    throw Error(ErrorKind::System, std::string("lohan SSD tier: could not start an I/O thread: ") + e.what());
  }
  for (auto& w : workers_) pthread_setname_np(w.native_handle(), "lohan-ssd-io");
}

SsdTier::~SsdTier() {
  try {
    close();
  } catch (...) {
  }
}

void SsdTier::close() {
  if (closed_.exchange(true)) return;
  {
    std::lock_guard<std::mutex> g(qm_);
    stop_ = true;
  }
  qcv_.notify_all();
  for (auto& w : workers_)
    if (w.joinable()) w.join();
  workers_.clear();
  for (int fd : fds_) ::close(fd);
  fds_.assign(fds_.size(), -1);
  // A forked child shares the parent's folders: only the creating process removes them.
  for (size_t i = 0; i < folders_.size(); ++i) {
    if (getpid() == owner_pid_ && !folders_[i].empty()) {
      int dirfd = open(dirs_[i].c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (dirfd >= 0) {
        try {
          DirLock lock(dirfd, dirs_[i]);  // no cleaner looks at the folder while it goes
          remove_folder(dirfd, folders_[i].substr(dirs_[i].size() + 1));
        } catch (...) {
        }
        ::close(dirfd);
      }
    }
    if (lock_fds_[i] >= 0) ::close(lock_fds_[i]);
    lock_fds_[i] = -1;
  }
}

std::vector<std::string> SsdTier::file_paths() const { return paths_; }

// ---- space --------------------------------------------------------------------

ExtentAllocator::Extent SsdTier::take_space(int file, uint64_t bytes) {
  const uint64_t region = static_cast<uint64_t>(file);
  if (auto ext = ext_.allocate_in(region, bytes)) return *ext;
  // grow the file at its end (a free tail there counts)
  const uint64_t size = ext_.region_size(region);
  const uint64_t extra = bytes - ext_.free_tail(region);
  if (opts_.preallocate && can_fallocate_) {
    int rc;
    while ((rc = fallocate(fds_[file], 0, static_cast<off_t>(size), static_cast<off_t>(extra))) != 0 &&
           errno == EINTR) {
    }
    if (rc != 0) {
      int err = errno;
      if (err == EOPNOTSUPP) {
        can_fallocate_ = false;  // errors will surface at write time instead
      } else {
        storage_error("cannot reserve " + format_bytes(extra) + " in " + paths_[file] + " (file size " +
                          format_bytes(size) + "): " + errno_text(err) + ". " + advice_for(err),
                      err);
      }
    }
  }
  ext_.grow_region(region, extra);
  auto ext = ext_.allocate_in(region, bytes);
  if (!ext) throw std::logic_error("SsdTier: grown file has no room");
  return *ext;
}

std::shared_ptr<SsdBlock> SsdTier::allocate(uint64_t nbytes) {
  if (closed_) throw Error(ErrorKind::Usage, "lohan SSD tier: allocation after the tier was closed");
  const uint64_t chunk = opts_.chunk_bytes;
  const uint64_t padded = round_up(std::max<uint64_t>(nbytes, 1), kAlign);
  const uint64_t chunks = (nbytes + chunk - 1) / chunk;
  const uint64_t files = static_cast<uint64_t>(opts_.files);
  std::lock_guard<std::mutex> g(m_);
  std::vector<SsdBlock::Part> parts;
  if (folders_.size() == 1) {
    // one drive: best fit in any file, else grow the smallest file
    auto ext = ext_.allocate(padded);
    if (!ext) {
      uint64_t best = 0, best_size = UINT64_MAX;
      for (const auto& [f, size] : ext_.regions())
        if (size < best_size) {
          best = f;
          best_size = size;
        }
      ext = take_space(static_cast<int>(best), padded);
    }
    parts.push_back({static_cast<int>(ext->region), ext->offset, padded});
  } else {
    // several drives: the block's chunks dealt over files of consecutive folders, starting
    // where the last block ended (consecutive files are in consecutive folders)
    const uint64_t n = std::max<uint64_t>(1, std::min<uint64_t>(folders_.size(), chunks));
    const uint64_t first = next_file_ % files;
    next_file_ = first + n;
    try {
      for (uint64_t j = 0; j < n; ++j) {
        uint64_t count = chunks > j ? (chunks - j + n - 1) / n : 0;
        uint64_t bytes = count * chunk;
        if (chunks > 0 && (chunks - 1) % n == j)  // holds the last chunk: only its sectors
          bytes = (count - 1) * chunk + round_up(nbytes - (chunks - 1) * chunk, kAlign);
        bytes = std::max<uint64_t>(bytes, kAlign);
        int file = static_cast<int>((first + j) % files);
        auto ext = take_space(file, bytes);
        parts.push_back({file, ext.offset, bytes});
      }
    } catch (...) {
      for (const auto& p : parts) ext_.release(static_cast<uint64_t>(p.file), p.offset);
      throw;
    }
  }
  ++live_blocks_;
  if (ext_.used_bytes() > peak_in_use_) peak_in_use_ = ext_.used_bytes();
  return std::shared_ptr<SsdBlock>(new SsdBlock(shared_from_this(), std::move(parts), nbytes, padded, chunks));
}

void SsdTier::release(const SsdBlock& b) {
  std::lock_guard<std::mutex> g(m_);
  for (const auto& p : b.parts_) ext_.release(static_cast<uint64_t>(p.file), p.offset);
  --live_blocks_;
}

SsdStats SsdTier::stats() const {
  std::lock_guard<std::mutex> g(m_);
  SsdStats s;
  s.in_use_bytes = ext_.used_bytes();
  s.peak_in_use_bytes = peak_in_use_;
  for (const auto& [f, size] : ext_.regions()) s.file_bytes += size;
  s.live_blocks = live_blocks_;
  s.writes = writes_;
  s.reads = reads_;
  s.bytes_written = bytes_written_;
  s.bytes_read = bytes_read_;
  s.failed_ios = failed_;
  s.staging_bytes = staging_bytes_;
  return s;
}

void SsdTier::check() const {
  std::lock_guard<std::mutex> g(m_);
  ext_.check();
}

// ---- I/O ----------------------------------------------------------------------

std::shared_ptr<Completion> SsdTier::write(const std::shared_ptr<SsdBlock>& b, const void* src,
                                           uint64_t src_capacity, Direction count_as) {
  if (closed_) throw Error(ErrorKind::Usage, "lohan SSD tier: write after the tier was closed");
  if (src_capacity < b->nbytes_)
    throw Error(ErrorKind::Usage, "lohan SSD tier: write source is smaller than the block");
  {
    std::lock_guard<std::mutex> g(b->m_);
    if (b->state_ == SsdBlock::State::Writing || b->reads_in_flight_ > 0)
      throw Error(ErrorKind::Usage, "lohan SSD tier: write to a block with I/O in flight; wait for it first");
    b->state_ = SsdBlock::State::Writing;
  }
  uint64_t chunks = b->sums_.size();
  auto done = std::make_shared<Completion>(static_cast<int64_t>(chunks));
  SsdBlock* blk = b.get();
  done->on_complete([this, blk](bool failed) {
    std::lock_guard<std::mutex> g(blk->m_);
    blk->state_ = failed ? SsdBlock::State::Failed : SsdBlock::State::Valid;
    if (!failed) ++writes_;
  });
  bool in_place = direct_ && reinterpret_cast<uintptr_t>(src) % kAlign == 0 && src_capacity >= b->padded_;
  std::vector<Task> tasks =
      chunk_tasks(true, blk, const_cast<char*>(static_cast<const char*>(src)), in_place, done, count_as);
  if (chunks == 0) {
    std::lock_guard<std::mutex> g(blk->m_);
    blk->state_ = SsdBlock::State::Valid;
  }
  submit(tasks);
  return done;
}

std::shared_ptr<Completion> SsdTier::read(const std::shared_ptr<SsdBlock>& b, void* dst, uint64_t dst_capacity,
                                          Direction count_as) {
  if (closed_) throw Error(ErrorKind::Usage, "lohan SSD tier: read after the tier was closed");
  if (dst_capacity < b->nbytes_)
    throw Error(ErrorKind::Usage, "lohan SSD tier: read destination is smaller than the block");
  {
    std::lock_guard<std::mutex> g(b->m_);
    switch (b->state_) {
      case SsdBlock::State::Valid:
        break;
      case SsdBlock::State::Writing:
        throw Error(ErrorKind::Usage,
                    "lohan SSD tier: read of a block whose write is still in flight; wait for the write first");
      case SsdBlock::State::Failed:
        storage_error("read of a block whose write failed: it holds no valid data", EIO);
      case SsdBlock::State::Empty:
        throw Error(ErrorKind::Usage, "lohan SSD tier: read of a block that was never written");
    }
    ++b->reads_in_flight_;
  }
  uint64_t chunks = b->sums_.size();
  auto done = std::make_shared<Completion>(static_cast<int64_t>(chunks));
  SsdBlock* blk = b.get();
  done->on_complete([this, blk](bool failed) {
    std::lock_guard<std::mutex> g(blk->m_);
    --blk->reads_in_flight_;
    if (!failed) ++reads_;
  });
  bool in_place = direct_ && reinterpret_cast<uintptr_t>(dst) % kAlign == 0 && dst_capacity >= b->padded_;
  std::vector<Task> tasks = chunk_tasks(false, blk, static_cast<char*>(dst), in_place, done, count_as);
  if (chunks == 0) {
    std::lock_guard<std::mutex> g(blk->m_);
    --blk->reads_in_flight_;
  }
  submit(tasks);
  return done;
}

std::vector<SsdTier::Task> SsdTier::chunk_tasks(bool write, SsdBlock* b, char* buf, bool in_place,
                                                const std::shared_ptr<Completion>& done, Direction dir) const {
  std::vector<Task> tasks;
  for (uint64_t c = 0; c < b->sums_.size(); ++c) tasks.push_back(Task{write, b, c, buf, in_place, done, dir});
  return tasks;
}

void SsdTier::submit(std::vector<Task>& tasks) {
  if (tasks.empty()) return;
  {
    std::lock_guard<std::mutex> g(qm_);
    if (stop_) throw Error(ErrorKind::Usage, "lohan SSD tier: I/O after the tier was closed");
    for (auto& t : tasks) {
      // each chunk on the queue of the file that holds it
      const auto& parts = t.block->parts_;
      const size_t file = static_cast<size_t>(parts[t.chunk % parts.size()].file);
      queues_[file].push_back(std::move(t));
    }
  }
  qcv_.notify_all();
}

void SsdTier::run(int index) {
  char* staging = nullptr;
  if (direct_) {
    // Huge pages: direct I/O into 4 KiB pages is far slower on virtual disks that
    // split requests per page. Touched now: the tier's footprint is fixed from its start.
    staging = static_cast<char*>(map_memory(opts_.chunk_bytes, /*touch=*/true));
    if (staging != nullptr) {
      std::lock_guard<std::mutex> g(m_);
      staging_bytes_ += opts_.chunk_bytes;
    }
  }
  const size_t nq = queues_.size();
  const size_t home = static_cast<size_t>(index) % nq;
  for (;;) {
    Task t;
    {
      std::unique_lock<std::mutex> g(qm_);
      size_t q = nq;
      qcv_.wait(g, [&] {
        for (size_t k = 0; k < nq; ++k)
          if (!queues_[(home + k) % nq].empty()) {
            q = (home + k) % nq;
            return true;
          }
        return stop_;
      });
      if (q == nq) break;  // stopped and every queue drained
      t = std::move(queues_[q].front());
      queues_[q].pop_front();
    }
    try {
      if (!direct_ || t.in_place || staging != nullptr) {
        execute(t, staging);
        t.done->part_done();
      } else {
        storage_error("an I/O thread has no staging buffer (the OS refused " + format_bytes(opts_.chunk_bytes) +
                          ")",
                      ENOMEM);
      }
    } catch (const Error& e) {
      ++failed_;
      t.done->part_failed(e.what(), e.kind(), e.err());
    } catch (const std::exception& e) {
      ++failed_;
      t.done->part_failed(std::string("lohan SSD tier: ") + e.what(), ErrorKind::Storage, 0);
    }
  }
  if (staging) munmap(staging, opts_.chunk_bytes);
}

void SsdTier::execute(const Task& t, char* staging) {
  const SsdBlock& b = *t.block;
  const uint64_t off = t.chunk * opts_.chunk_bytes;
  const uint64_t len = std::min(opts_.chunk_bytes, b.nbytes_ - off);
  const SsdBlock::Part& part = b.parts_[t.chunk % b.parts_.size()];
  const uint64_t file_off = part.offset + (t.chunk / b.parts_.size()) * opts_.chunk_bytes;
  const int fd = fds_[static_cast<size_t>(part.file)];
  const std::string& path = paths_[static_cast<size_t>(part.file)];
  // Direct I/O moves whole 4096-byte sectors; the block's padding absorbs the tail.
  const uint64_t io_len = direct_ ? round_up(len, kAlign) : len;
  char* user = t.buf + off;
  const int64_t span_start = timeline_recording() ? monotonic_ns() : 0;
  if (t.write) {
    const char* src = user;
    if (direct_ && !t.in_place) {
      std::memcpy(staging, user, len);
      std::memset(staging + len, 0, io_len - len);
      src = staging;
    }
    t.block->sums_[t.chunk] = fingerprint_bytes(reinterpret_cast<const unsigned char*>(src), len);
    pwrite_full(fd, src, io_len, file_off, path);
    bytes_written_ += len;
    global_counters().ssd_write.fetch_add(len, std::memory_order_relaxed);
  } else {
    char* dst = (direct_ && !t.in_place) ? staging : user;
    pread_full(fd, dst, io_len, file_off, path);
    uint64_t sum = fingerprint_bytes(reinterpret_cast<const unsigned char*>(dst), len);
    if (sum != b.sums_[t.chunk])
      storage_error("checksum mismatch in " + path + " at offset " + std::to_string(file_off) + " (" +
                        format_bytes(len) +
                        "): the bytes on disk are not the ones written (corrupted, or overwritten by "
                        "another program). The block is refused.",
                    EIO);
    if (dst != user) std::memcpy(user, dst, len);
    bytes_read_ += len;
    global_counters().ssd_read.fetch_add(len, std::memory_order_relaxed);
  }
  if (span_start) record_span(t.write ? SpanKind::SsdWrite : SpanKind::SsdRead, len, span_start, monotonic_ns());
  // d2h/h2d count the bytes that left or reached the device tier through the SSD.
  if (t.dir != Direction::Other) global_counters().add(t.dir, len);
}

}  // namespace host
}  // namespace lohan
