// Small, typed wrappers over OpenSSL 3 for the primitives keygate uses.
// Key material always travels in SecretBuffer; a private key stays inside
// OpenSSL's key object, in OpenSSL's secure heap.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "core/encoding.h"
#include "core/secret.h"
#include "core/status.h"

struct evp_pkey_st;  // OpenSSL's EVP_PKEY

namespace keygate {

constexpr size_t kX25519KeySize = 32;
constexpr size_t kAesKeySize = 32;
constexpr size_t kGcmIvSize = 12;
constexpr size_t kGcmTagSize = 16;
constexpr size_t kSha256Size = 32;

Bytes random_bytes(size_t n);

Bytes sha256(std::string_view data);
inline Bytes sha256(const Bytes& data) { return sha256(as_string_view(data)); }

// HMAC-SHA256 keyed by a secret.
Bytes hmac_sha256(const SecretBuffer& key, std::string_view data);

// Constant-time equality for non-secret-typed byte strings (MACs, digests).
bool constant_time_equal(const Bytes& a, const Bytes& b);

// AES-256-GCM. `key` must be 32 bytes. Output of seal: iv || ciphertext || tag.
Result<Bytes> aes_gcm_seal(const SecretBuffer& key, const uint8_t* plaintext, size_t size,
                           std::string_view aad);
// Opens iv || ciphertext || tag; any change to it or to `aad` fails with kIntegrity.
Result<SecretBuffer> aes_gcm_open(const SecretBuffer& key, const Bytes& sealed,
                                  std::string_view aad);

// HKDF-SHA256 (RFC 5869) into a SecretBuffer of `length` bytes.
Result<SecretBuffer> hkdf_sha256(const SecretBuffer& ikm, const Bytes& salt, std::string_view info,
                                 size_t length);

// An ephemeral X25519 key pair. The private key never leaves OpenSSL's key
// object, which keeps it in OpenSSL's secure heap once
// init_openssl_secure_heap() has run (locked, not dumped, wiped on free).
struct X25519KeyPair {
  std::shared_ptr<evp_pkey_st> key;  // EVP_PKEY
  std::array<uint8_t, kX25519KeySize> public_key{};

  static Result<X25519KeyPair> generate();
  // ECDH with a peer's raw public key. Refuses low-order points (all-zero output).
  Result<SecretBuffer> shared_secret(const Bytes& peer_public) const;
};

// The oldest queued OpenSSL error as text (queue cleared), for messages.
std::string openssl_last_error();

// SHA-256 over the DER of the first certificate in `pem`, as lowercase hex.
Result<std::string> certificate_sha256_fingerprint(std::string_view pem);

}  // namespace keygate
