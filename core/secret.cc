#include "core/secret.h"

#include "core/file.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <vector>

namespace keygate {
namespace {

// Locked, non-dumpable, non-inherited anonymous memory of `size` bytes.
void* map_secret_pages(size_t size) {
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  // Locking can fail under a small RLIMIT_MEMLOCK; the memory is still
  // excluded from dumps and wiped, so carry on rather than fail an unlock.
  // The system call itself, not libc's mlock(): the sanitizer runtimes
  // replace mlock() with a no-op that reports success, and a test build
  // must hold secrets the way a release build does.
  (void)syscall(SYS_mlock, p, size);
  (void)madvise(p, size, MADV_DONTDUMP);
#ifdef MADV_WIPEONFORK
  (void)madvise(p, size, MADV_WIPEONFORK);
#endif
  return p;
}

// The pool of small-secret slots: chunks of such pages, carved into slots,
// never unmapped (its size follows the most secrets alive at once); a slot
// is wiped whole before it goes back on the free list.
class SlotPool {
 public:
  static SlotPool& instance() {
    static SlotPool* pool = new SlotPool;  // never destroyed: buffers may outlive statics
    return *pool;
  }

  uint8_t* take() {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty() && !grow()) return nullptr;
    uint8_t* slot = free_.back();
    free_.pop_back();
    ++in_use_;
    return slot;
  }

  void give_back(uint8_t* slot) {
    secure_wipe(slot, kSecretSlotSize);
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(slot);
    --in_use_;
  }

  size_t in_use() {
    std::lock_guard<std::mutex> lock(mu_);
    return in_use_;
  }

 private:
  // 64 slots; locking a chunk faults its pages in, so it starts small.
  static constexpr size_t kChunkSize = 16 * 1024;

  bool grow() {
    auto* chunk = static_cast<uint8_t*>(map_secret_pages(kChunkSize));
    if (chunk == nullptr) return false;
    free_.reserve(free_.size() + kChunkSize / kSecretSlotSize);
    for (size_t off = kChunkSize; off >= kSecretSlotSize; off -= kSecretSlotSize) {
      free_.push_back(chunk + off - kSecretSlotSize);
    }
    return true;
  }

  std::mutex mu_;
  std::vector<uint8_t*> free_;
  size_t in_use_ = 0;
};

}  // namespace

size_t secret_slots_in_use() { return SlotPool::instance().in_use(); }

void secure_wipe(void* data, size_t size) {
  if (data != nullptr && size > 0) OPENSSL_cleanse(data, size);
}

SecretBuffer::~SecretBuffer() { release(); }

SecretBuffer::SecretBuffer(SecretBuffer&& other) noexcept
    : data_(other.data_), size_(other.size_), mapped_(other.mapped_) {
  other.data_ = nullptr;
  other.size_ = 0;
  other.mapped_ = 0;
}

SecretBuffer& SecretBuffer::operator=(SecretBuffer&& other) noexcept {
  if (this != &other) {
    release();
    data_ = other.data_;
    size_ = other.size_;
    mapped_ = other.mapped_;
    other.data_ = nullptr;
    other.size_ = 0;
    other.mapped_ = 0;
  }
  return *this;
}

void SecretBuffer::release() {
  if (data_ == nullptr) return;
  if (mapped_ == 0) {
    SlotPool::instance().give_back(data_);
  } else {
    secure_wipe(data_, mapped_);
    munmap(data_, mapped_);  // unlocks the pages too
  }
  data_ = nullptr;
  size_ = 0;
  mapped_ = 0;
}

Result<SecretBuffer> SecretBuffer::allocate(size_t size) {
  SecretBuffer buf;
  if (size <= kSecretSlotSize) {
    // Slots are wiped when returned, so a new one is all zeros.
    buf.data_ = SlotPool::instance().take();
    if (buf.data_ == nullptr) {
      return Status::error(ErrorKind::kInternal, str_cat("mmap secret pool: ", strerror(errno)));
    }
    buf.size_ = size;
    return buf;
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t mapped = (size + page - 1) / page * page;
  void* p = map_secret_pages(mapped);
  if (p == nullptr) {
    return Status::error(ErrorKind::kInternal, str_cat("mmap secret buffer: ", strerror(errno)));
  }
  buf.data_ = static_cast<uint8_t*>(p);
  buf.size_ = size;
  buf.mapped_ = mapped;
  return buf;
}

Result<SecretBuffer> SecretBuffer::random(size_t size) {
  auto buf = allocate(size);
  if (!buf.is_ok()) return buf.status();
  if (size > 0 && RAND_bytes(buf->data(), static_cast<int>(size)) != 1) {
    return Status::error(ErrorKind::kInternal, "RAND_bytes failed");
  }
  return buf;
}

Result<SecretBuffer> SecretBuffer::copy_of(const void* data, size_t size) {
  auto buf = allocate(size);
  if (!buf.is_ok()) return buf.status();
  if (size > 0) memcpy(buf->data(), data, size);
  return buf;
}

void SecretBuffer::truncate(size_t new_size) {
  if (new_size >= size_) return;
  secure_wipe(data_ + new_size, size_ - new_size);
  size_ = new_size;
}

bool SecretBuffer::equals(const SecretBuffer& other) const {
  if (size_ != other.size_) return false;
  if (size_ == 0) return true;
  return CRYPTO_memcmp(data_, other.data_, size_) == 0;
}

Result<SecretBuffer> read_secret_file(const std::string& path, size_t max_size,
                                      bool strip_newline) {
  int fd = path == "-" ? dup(STDIN_FILENO) : open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("open ", path, ": ", strerror(errno)));
  }
  auto buf = SecretBuffer::allocate(max_size + 1);
  if (!buf.is_ok()) {
    close(fd);
    return buf.status();
  }
  auto count = read_up_to(fd, buf->data(), max_size + 1, path);
  close(fd);
  if (!count.is_ok()) return count.status();
  size_t used = count.value();
  if (used > max_size) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("read ", path, ": longer than ", max_size, " bytes"));
  }
  if (strip_newline && used > 0 && buf->data()[used - 1] == '\n') --used;
  if (used == 0) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("read ", path, ": empty"));
  }
  buf->truncate(used);
  return std::move(buf).value();
}

Status init_openssl_secure_heap(size_t bytes) {
  if (CRYPTO_secure_malloc_initialized()) return Status::ok();
  // In 32-byte units: a private key takes one or two.
  if (CRYPTO_secure_malloc_init(bytes, 32) == 0) {
    return Status::error(ErrorKind::kInternal, "OpenSSL secure heap: could not be set up");
  }
  return Status::ok();
}

void disable_core_dumps() {
  struct rlimit none = {0, 0};
  (void)setrlimit(RLIMIT_CORE, &none);
  (void)prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
}

}  // namespace keygate
