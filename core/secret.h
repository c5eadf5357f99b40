// SecretBuffer: the one type that holds key material, passphrases and tokens.
// Its memory is locked (mlock), excluded from core dumps (MADV_DONTDUMP), not
// inherited by children (MADV_WIPEONFORK), and wiped when the buffer goes.
// Small buffers (up to kSecretSlotSize bytes: keys, tokens, passphrases) are
// slots of a pool of such pages, so a secret costs no system call; a larger
// one is a mapping of its own, unmapped after the wipe. Move-only; it cannot
// be printed or converted to a string, so no secret can reach a log line by
// accident.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/status.h"

namespace keygate {

constexpr size_t kSecretSlotSize = 256;

class SecretBuffer {
 public:
  SecretBuffer() = default;
  ~SecretBuffer();
  SecretBuffer(const SecretBuffer&) = delete;
  SecretBuffer& operator=(const SecretBuffer&) = delete;
  SecretBuffer(SecretBuffer&& other) noexcept;
  SecretBuffer& operator=(SecretBuffer&& other) noexcept;

  // A zero-filled buffer of `size` bytes. Fails only if memory cannot be mapped.
  static Result<SecretBuffer> allocate(size_t size);
  // `size` bytes from the system CSPRNG.
  static Result<SecretBuffer> random(size_t size);
  // A copy of `size` bytes at `data` (the caller wipes its own copy).
  static Result<SecretBuffer> copy_of(const void* data, size_t size);

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

  // Shrinks the visible size (the tail is wiped). For reads of unknown length.
  void truncate(size_t new_size);

  // Constant-time comparison.
  bool equals(const SecretBuffer& other) const;

 private:
  void release();
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t mapped_ = 0;  // 0: a pool slot
};

// How many pool slots are handed out (for tests: every buffer returns its slot).
size_t secret_slots_in_use();

// Reads a whole file (or "-" for standard input) into a SecretBuffer, at most
// `max_size` bytes. With `strip_newline`, one trailing "\n" is dropped, so a
// passphrase file written by `echo` works as expected.
Result<SecretBuffer> read_secret_file(const std::string& path, size_t max_size,
                                      bool strip_newline);

// Disables core dumps for this process (RLIMIT_CORE=0 and PR_SET_DUMPABLE=0).
void disable_core_dumps();

// Gives OpenSSL a secure heap (locked, not dumped, guard pages, wiped on
// free) for the private keys it holds: the TLS key, each handshake's
// ephemeral key and X25519KeyPair's. Call once, at start, before any key
// exists. `bytes` (a power of two) is locked at once, page by page: the
// unlocker, which holds a few keys, asks for little. Fails if the heap
// cannot be set up.
constexpr size_t kSecureHeapServer = 2 << 20;  // the keys of thousands of handshakes at once
constexpr size_t kSecureHeapClient = 32 << 10;
Status init_openssl_secure_heap(size_t bytes);

// Wipes memory in a way the compiler will not elide.
void secure_wipe(void* data, size_t size);

}  // namespace keygate
