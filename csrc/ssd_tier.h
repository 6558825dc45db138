// The SSD tier: blocks stored in files under one or several folders (ssd_dir),
// read and written by a pool of I/O threads.
//
// Layout. In each folder the tier owns a private folder
// <dir>/lohan-ssd-<32 random hex> (mode 0700) holding a lock file and data
// files (mode 0600): data file i lives in folder i % folders. A private
// folder is created, and stale folders of dead runs are removed, while
// holding <dir>/.lohan-ssd.lock (flock), so a cleaner never sees a folder
// between its creation and the moment its owner locks it. A live tier holds
// flock on its own lock files for its whole life; the kernel drops them
// when the process dies, which is how the next run knows a folder is stale.
// Several runs (or several tiers in one process) can share a folder.
//
// Striping. With several folders (one per drive, as a RAID 0), a block of
// more than one chunk is cut in chunk_bytes stripes dealt round-robin over
// parts in files of different folders, so its chunks are read and written on
// every drive at once; a block of one chunk lives in one file, the next block
// in the next folder's.
//
// I/O. pread/pwrite in chunks, with O_DIRECT where the filesystem takes it
// (offsets, lengths and buffers aligned to 4096; data that is not aligned
// goes through a per-thread aligned staging buffer), buffered I/O otherwise
// (io_mode() says which, and why). Each data file has its own queue; a
// thread serves its own file's queue first and helps the others when idle.
//
// Validity. A block is readable only after every chunk of its last write
// succeeded (write-then-commit, in memory), and every chunk carries a
// 64-bit fingerprint checked on read: a half-written, truncated or
// overwritten block is refused, never returned as valid data.
//
// Space. With `preallocate`, space is reserved with fallocate when a block
// is allocated, so a full disk or a file-size limit fails the allocation
// itself, on the calling thread; otherwise such errors surface when the
// write is waited on. Freed extents are reused (best fit, coalesced).

#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "copy_engine.h"
#include "extent_allocator.h"
#include "host_common.h"

namespace lohan {
namespace host {

struct SsdOptions {
  std::vector<std::string> dirs;  // one folder, or several striped
  int files = 2;                  // data files in all (at least one per folder)
  int threads = 4;
  uint64_t chunk_bytes = 4ull << 20;
  int direct = -1;  // -1: O_DIRECT where supported; 0: never; 1: required
  bool preallocate = true;
};

struct SsdStats {
  uint64_t in_use_bytes = 0;  // live blocks, padded to 4096
  uint64_t peak_in_use_bytes = 0;
  uint64_t file_bytes = 0;    // space the data files hold
  uint64_t live_blocks = 0;
  uint64_t writes = 0;        // completed block writes / reads
  uint64_t reads = 0;
  uint64_t bytes_written = 0;  // payload bytes
  uint64_t bytes_read = 0;
  uint64_t failed_ios = 0;
  uint64_t staging_bytes = 0;  // aligned staging buffers of the I/O threads
};

class SsdTier;

class SsdBlock {
 public:
  ~SsdBlock();
  SsdBlock(const SsdBlock&) = delete;
  SsdBlock& operator=(const SsdBlock&) = delete;
  uint64_t nbytes() const { return nbytes_; }
  uint64_t padded_bytes() const { return padded_; }
  // Where its chunks are: chunk c in part c % parts, at (c / parts) * chunk_bytes in it.
  struct Part {
    int file;
    uint64_t offset;
    uint64_t bytes;  // on disk
  };
  const std::vector<Part>& parts() const { return parts_; }
  int file() const { return parts_[0].file; }
  uint64_t offset() const { return parts_[0].offset; }
  // True once a write completed successfully (and no write is in flight).
  bool valid() const;
  const std::shared_ptr<SsdTier>& tier() const { return tier_; }

 private:
  friend class SsdTier;
  SsdBlock(std::shared_ptr<SsdTier> tier, std::vector<Part> parts, uint64_t nbytes, uint64_t padded,
           uint64_t chunks)
      : tier_(std::move(tier)), parts_(std::move(parts)), nbytes_(nbytes), padded_(padded), sums_(chunks) {}

  enum class State { Empty, Writing, Valid, Failed };
  std::shared_ptr<SsdTier> tier_;
  std::vector<Part> parts_;
  uint64_t nbytes_;
  uint64_t padded_;
  std::vector<uint64_t> sums_;  // one fingerprint per chunk, set by the write
  mutable std::mutex m_;
  State state_ = State::Empty;
  int reads_in_flight_ = 0;
};

class SsdTier : public std::enable_shared_from_this<SsdTier> {
 public:
  static std::shared_ptr<SsdTier> create(const SsdOptions& opts);
  ~SsdTier();
  SsdTier(const SsdTier&) = delete;
  SsdTier& operator=(const SsdTier&) = delete;

  // Reserves space for nbytes. Throws Error(Storage) when the disk is full or a
  // file-size limit is reached (with preallocate), Error(Usage) after close().
  std::shared_ptr<SsdBlock> allocate(uint64_t nbytes);

  // Writes nbytes of src into the block. src and the block must stay alive
  // until the completion is done (I/O threads hold neither: the caller
  // owns both, as the step thread owns a swap's tensors); `src_capacity` >= nbytes says how many bytes may be read
  // there (an aligned src with room for the padding is written in place).
  std::shared_ptr<Completion> write(const std::shared_ptr<SsdBlock>& b, const void* src,
                                    uint64_t src_capacity, Direction count_as);
  // Reads the block into dst (capacity as above). Throws if the block holds
  // no complete write; the completion fails on a short read or bad checksum.
  std::shared_ptr<Completion> read(const std::shared_ptr<SsdBlock>& b, void* dst, uint64_t dst_capacity,
                                   Direction count_as);

  // Finishes queued I/O, joins the threads, removes the files and the folder.
  // Idempotent. In a forked child it only closes descriptors.
  void close();
  bool closed() const { return closed_.load(); }

  const std::string& folder() const { return folders_[0]; }  // the first folder's
  const std::vector<std::string>& folders() const { return folders_; }
  bool direct_io() const { return direct_; }
  const std::string& io_mode() const { return io_mode_; }
  std::vector<std::string> file_paths() const;
  const SsdOptions& options() const { return opts_; }
  SsdStats stats() const;
  void check() const;

  // Removes private folders of dead runs from dir (under the dir lock);
  // returns how many were removed. Live runs' folders are left alone.
  static int cleanup_stale(const std::string& dir);

 private:
  friend class SsdBlock;
  explicit SsdTier(const SsdOptions& opts) : opts_(opts) {}
  void make_folder(size_t i, int dirfd);
  void open_files(const std::vector<int>& folder_fds);
  // Space for `bytes` in `file`, growing it at its end when nothing free there holds it.
  ExtentAllocator::Extent take_space(int file, uint64_t bytes);
  void start_threads();
  void release(const SsdBlock& b);

  struct Task {
    bool write;
    SsdBlock* block;  // kept alive by the caller until `done`
    uint64_t chunk;
    char* buf;       // src (write) or dst (read), whole block
    bool in_place;   // direct I/O straight from/to buf (aligned, room for padding)
    std::shared_ptr<Completion> done;
    Direction dir;
  };
  void submit(std::vector<Task>& tasks);
  void run(int index);
  void execute(const Task& t, char* staging);
  std::vector<Task> chunk_tasks(bool write, SsdBlock* b, char* buf, bool in_place,
                                const std::shared_ptr<Completion>& done, Direction dir) const;
  int file_fd(int file) const { return fds_[file]; }

  SsdOptions opts_;
  std::vector<std::string> folders_;  // the private folders, one per dirs entry
  std::vector<std::string> dirs_;
  std::vector<std::string> paths_;
  std::vector<int> fds_;
  std::vector<int> lock_fds_;
  uint64_t next_file_ = 0;  // where the next one-chunk block or stripe set starts
  pid_t owner_pid_ = 0;
  bool direct_ = false;
  std::string io_mode_;
  bool can_fallocate_ = true;

  mutable std::mutex m_;  // allocator, stats
  ExtentAllocator ext_;
  uint64_t live_blocks_ = 0, peak_in_use_ = 0;
  std::atomic<uint64_t> writes_{0}, reads_{0}, bytes_written_{0}, bytes_read_{0}, failed_{0};
  uint64_t staging_bytes_ = 0;

  std::mutex qm_;  // queues
  std::condition_variable qcv_;
  std::vector<std::deque<Task>> queues_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
  std::atomic<bool> closed_{false};
};

}  // namespace host
}  // namespace lohan
