#include "core/secret.h"

#include "core/file.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace keygate {

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
  secure_wipe(data_, mapped_);
  munlock(data_, mapped_);
  munmap(data_, mapped_);
  data_ = nullptr;
  size_ = 0;
  mapped_ = 0;
}

Result<SecretBuffer> SecretBuffer::allocate(size_t size) {
  SecretBuffer buf;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t mapped = ((size == 0 ? 1 : size) + page - 1) / page * page;
  void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    return Status::error(ErrorKind::kInternal, str_cat("mmap secret buffer: ", strerror(errno)));
  }
  // Locking can fail under a small RLIMIT_MEMLOCK; the buffer is still
  // excluded from dumps and wiped, so carry on rather than fail an unlock.
  (void)mlock(p, mapped);
  (void)madvise(p, mapped, MADV_DONTDUMP);
#ifdef MADV_WIPEONFORK
  (void)madvise(p, mapped, MADV_WIPEONFORK);
#endif
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

void disable_core_dumps() {
  struct rlimit none = {0, 0};
  (void)setrlimit(RLIMIT_CORE, &none);
  (void)prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
}

}  // namespace keygate
