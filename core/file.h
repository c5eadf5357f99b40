// Small-file helpers for non-secret data (certificates, configuration, state
// markers). Secrets are read with read_secret_file (core/secret.h).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "core/status.h"

namespace keygate {

// A file written whole or not at all: the data goes to `path`.tmp, and
// commit() fsyncs it, renames it over `path` and fsyncs the folder. Until
// then `path` is untouched; a writer dropped (or an error) before commit
// removes the temporary file.
class AtomicFileWriter {
 public:
  AtomicFileWriter() = default;
  ~AtomicFileWriter() { abandon(); }
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  Status open(const std::string& path, unsigned mode);
  Status append(std::string_view data);
  Status commit();
  void abandon();

 private:
  int fd_ = -1;
  std::string path_;
  std::string tmp_;
};

// Writes `data` to `path` via a temporary file, fsync, rename and an fsync
// of the folder, with `mode`: a crash or power loss leaves either the old
// file or the new one, never a torn one.
Status write_file_atomically(const std::string& path, std::string_view data, unsigned mode);

// fsyncs the folder holding `path`, so that a name made or changed in it
// survives a power loss.
Status sync_parent_dir(const std::string& path);

// Creates the state folder `dir` (0700) if missing.
Status ensure_state_dir(const std::string& dir);

// Reads from `fd` into `dst` until end of file or `capacity` bytes; returns
// the count. `name` is for error messages. Does not close `fd`.
Result<size_t> read_up_to(int fd, uint8_t* dst, size_t capacity, const std::string& name);

// Reads a whole file of at most `max_size` bytes.
Result<std::string> read_small_file(const std::string& path, size_t max_size);

}  // namespace keygate
