#include "core/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace keygate {

Status AtomicFileWriter::open(const std::string& path, unsigned mode) {
  if (fd_ >= 0) return Status::error(ErrorKind::kInternal, str_cat("write ", path, ": already open"));
  path_ = path;
  tmp_ = path + ".tmp";
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd_ < 0) return Status::error(ErrorKind::kIo, str_cat("create ", tmp_, ": ", strerror(errno)));
  fchmod(fd_, mode);
  return Status::ok();
}

Status AtomicFileWriter::append(std::string_view data) {
  if (fd_ < 0) return Status::error(ErrorKind::kInternal, "write: no file open");
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = write(fd_, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      abandon();
      return Status::error(ErrorKind::kIo, str_cat("write ", tmp_, ": ", strerror(err)));
    }
    done += static_cast<size_t>(n);
  }
  return Status::ok();
}

Status AtomicFileWriter::commit() {
  if (fd_ < 0) return Status::error(ErrorKind::kInternal, "write: no file open");
  const int fd = fd_;
  fd_ = -1;
  if (fsync(fd) != 0 || close(fd) != 0) {
    const int err = errno;
    unlink(tmp_.c_str());
    return Status::error(ErrorKind::kIo, str_cat("sync ", tmp_, ": ", strerror(err)));
  }
  if (rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    unlink(tmp_.c_str());
    return Status::error(ErrorKind::kIo, str_cat("rename to ", path_, ": ", strerror(err)));
  }
  return sync_parent_dir(path_);
}

void AtomicFileWriter::abandon() {
  if (fd_ < 0) return;
  close(fd_);
  fd_ = -1;
  unlink(tmp_.c_str());
}

Status write_file_atomically(const std::string& path, std::string_view data, unsigned mode) {
  AtomicFileWriter out;
  KEYGATE_RETURN_IF_ERROR(out.open(path, mode));
  KEYGATE_RETURN_IF_ERROR(out.append(data));
  return out.commit();
}

Status sync_parent_dir(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::error(ErrorKind::kIo, str_cat("open ", dir, ": ", strerror(errno)));
  const bool ok = fsync(fd) == 0;
  const int err = errno;
  close(fd);
  if (!ok) return Status::error(ErrorKind::kIo, str_cat("sync ", dir, ": ", strerror(err)));
  return Status::ok();
}

Result<size_t> read_up_to(int fd, uint8_t* dst, size_t capacity, const std::string& name) {
  size_t used = 0;
  while (used < capacity) {
    ssize_t n = read(fd, dst + used, capacity - used);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::error(ErrorKind::kIo, str_cat("read ", name, ": ", strerror(errno)));
    if (n == 0) break;
    used += static_cast<size_t>(n);
  }
  return used;
}

Result<std::string> read_small_file(const std::string& path, size_t max_size) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::error(ErrorKind::kIo, str_cat("open ", path, ": ", strerror(errno)));
  std::string out(max_size + 1, '\0');
  auto used = read_up_to(fd, reinterpret_cast<uint8_t*>(out.data()), out.size(), path);
  close(fd);
  if (!used.is_ok()) return used.status();
  if (used.value() > max_size) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat(path, ": larger than ", max_size, " bytes"));
  }
  out.resize(used.value());
  return out;
}

Status ensure_state_dir(const std::string& dir) {
  if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return Status::error(ErrorKind::kIo, str_cat("create state folder ", dir, ": ",
                                                 strerror(errno)));
  }
  return Status::ok();
}

}  // namespace keygate
