#include "core/crypto.h"

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/core_names.h>
#include <openssl/kdf.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>

#include <memory>
#include <stdexcept>

namespace keygate {
namespace {

struct CipherCtxFree {
  void operator()(EVP_CIPHER_CTX* c) const { EVP_CIPHER_CTX_free(c); }
};
struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct PkeyCtxFree {
  void operator()(EVP_PKEY_CTX* c) const { EVP_PKEY_CTX_free(c); }
};

Status crypto_error(const char* what) {
  return Status::error(ErrorKind::kInternal, str_cat("OpenSSL ", what, " failed"));
}

// The algorithms, fetched from OpenSSL's provider once: a fetch per call
// (what EVP_sha256() and friends do in OpenSSL 3) costs more than the small
// operations themselves.
const EVP_MD* sha256_md() {
  static const EVP_MD* md = [] {
    const EVP_MD* m = EVP_MD_fetch(nullptr, "SHA2-256", nullptr);
    return m != nullptr ? m : EVP_sha256();
  }();
  return md;
}

const EVP_CIPHER* aes_256_gcm() {
  static const EVP_CIPHER* cipher = [] {
    const EVP_CIPHER* c = EVP_CIPHER_fetch(nullptr, "AES-256-GCM", nullptr);
    return c != nullptr ? c : EVP_aes_256_gcm();
  }();
  return cipher;
}

EVP_KDF* hkdf_kdf() {
  static EVP_KDF* kdf = EVP_KDF_fetch(nullptr, "HKDF", nullptr);
  return kdf;
}

}  // namespace

Bytes random_bytes(size_t n) {
  Bytes out(n);
  if (n > 0 && RAND_bytes(out.data(), static_cast<int>(n)) != 1) {
    // The CSPRNG failing is not recoverable; never continue with weak bytes.
    abort();
  }
  return out;
}

Bytes sha256(std::string_view data) {
  Bytes out(kSha256Size);
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), out.data(), &len, sha256_md(), nullptr);
  return out;
}

Bytes hmac_sha256(const SecretBuffer& key, std::string_view data) {
  Bytes out(kSha256Size);
  unsigned int len = 0;
  HMAC(sha256_md(), key.data(), static_cast<int>(key.size()),
       reinterpret_cast<const unsigned char*>(data.data()), data.size(), out.data(), &len);
  return out;
}

bool constant_time_equal(const Bytes& a, const Bytes& b) {
  return a.size() == b.size() && (a.empty() || CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0);
}

Result<Bytes> aes_gcm_seal(const SecretBuffer& key, const uint8_t* plaintext, size_t size,
                           std::string_view aad) {
  if (key.size() != kAesKeySize) {
    return Status::error(ErrorKind::kInternal, "AES-256-GCM key must be 32 bytes");
  }
  std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree> ctx(EVP_CIPHER_CTX_new());
  if (!ctx) return crypto_error("EVP_CIPHER_CTX_new");
  Bytes out = random_bytes(kGcmIvSize);
  out.resize(kGcmIvSize + size + kGcmTagSize);
  int len = 0;
  if (EVP_EncryptInit_ex(ctx.get(), aes_256_gcm(), nullptr, key.data(), out.data()) != 1 ||
      EVP_EncryptUpdate(ctx.get(), nullptr, &len, reinterpret_cast<const uint8_t*>(aad.data()),
                        static_cast<int>(aad.size())) != 1 ||
      EVP_EncryptUpdate(ctx.get(), out.data() + kGcmIvSize, &len, plaintext,
                        static_cast<int>(size)) != 1 ||
      EVP_EncryptFinal_ex(ctx.get(), out.data() + kGcmIvSize + len, &len) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, kGcmTagSize,
                          out.data() + kGcmIvSize + size) != 1) {
    return crypto_error("AES-256-GCM encrypt");
  }
  return out;
}

Result<SecretBuffer> aes_gcm_open(const SecretBuffer& key, const Bytes& sealed,
                                  std::string_view aad) {
  if (key.size() != kAesKeySize) {
    return Status::error(ErrorKind::kInternal, "AES-256-GCM key must be 32 bytes");
  }
  if (sealed.size() < kGcmIvSize + kGcmTagSize) {
    return Status::error(ErrorKind::kIntegrity, "sealed data too short");
  }
  const size_t ct_size = sealed.size() - kGcmIvSize - kGcmTagSize;
  auto plain = SecretBuffer::allocate(ct_size);
  if (!plain.is_ok()) return plain.status();
  std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree> ctx(EVP_CIPHER_CTX_new());
  if (!ctx) return crypto_error("EVP_CIPHER_CTX_new");
  Bytes tag(sealed.end() - kGcmTagSize, sealed.end());
  int len = 0;
  if (EVP_DecryptInit_ex(ctx.get(), aes_256_gcm(), nullptr, key.data(), sealed.data()) != 1 ||
      EVP_DecryptUpdate(ctx.get(), nullptr, &len, reinterpret_cast<const uint8_t*>(aad.data()),
                        static_cast<int>(aad.size())) != 1 ||
      EVP_DecryptUpdate(ctx.get(), plain->data(), &len, sealed.data() + kGcmIvSize,
                        static_cast<int>(ct_size)) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, kGcmTagSize, tag.data()) != 1) {
    return crypto_error("AES-256-GCM decrypt");
  }
  if (EVP_DecryptFinal_ex(ctx.get(), plain->data() + len, &len) != 1) {
    return Status::error(ErrorKind::kIntegrity, "authentication tag mismatch");
  }
  return std::move(plain).value();
}

Result<SecretBuffer> hkdf_sha256(const SecretBuffer& ikm, const Bytes& salt, std::string_view info,
                                 size_t length) {
  EVP_KDF* kdf = hkdf_kdf();
  if (kdf == nullptr) return crypto_error("HKDF fetch");
  std::unique_ptr<EVP_KDF_CTX, decltype(&EVP_KDF_CTX_free)> kctx(EVP_KDF_CTX_new(kdf),
                                                                 EVP_KDF_CTX_free);
  auto out = SecretBuffer::allocate(length);
  if (!out.is_ok()) return out.status();
  char digest[] = "SHA2-256";
  const OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<uint8_t*>(ikm.data()), ikm.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, const_cast<uint8_t*>(salt.data()),
                                        salt.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, const_cast<char*>(info.data()),
                                        info.size()),
      OSSL_PARAM_construct_end()};
  if (!kctx || EVP_KDF_derive(kctx.get(), out->data(), length, params) != 1) {
    return crypto_error("HKDF-SHA256");
  }
  return std::move(out).value();
}

Result<X25519KeyPair> X25519KeyPair::generate() {
  X25519KeyPair kp;
  EVP_PKEY* raw = nullptr;
  std::unique_ptr<EVP_PKEY_CTX, PkeyCtxFree> ctx(EVP_PKEY_CTX_new_id(EVP_PKEY_X25519, nullptr));
  if (!ctx || EVP_PKEY_keygen_init(ctx.get()) != 1 || EVP_PKEY_keygen(ctx.get(), &raw) != 1) {
    return crypto_error("X25519 key generation");
  }
  kp.key = std::shared_ptr<EVP_PKEY>(raw, EVP_PKEY_free);
  size_t len = kX25519KeySize;
  if (EVP_PKEY_get_raw_public_key(raw, kp.public_key.data(), &len) != 1 || len != kX25519KeySize) {
    return crypto_error("X25519 key generation");
  }
  return kp;
}

Result<SecretBuffer> X25519KeyPair::shared_secret(const Bytes& peer_public) const {
  if (peer_public.size() != kX25519KeySize) {
    return Status::error(ErrorKind::kInvalidArgument, "X25519 public key must be 32 bytes");
  }
  if (!key) return Status::error(ErrorKind::kInternal, "X25519 key pair without a key");
  std::unique_ptr<EVP_PKEY, PkeyFree> peer(
      EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, nullptr, peer_public.data(), peer_public.size()));
  if (!peer) return crypto_error("X25519 key import");
  std::unique_ptr<EVP_PKEY_CTX, PkeyCtxFree> ctx(EVP_PKEY_CTX_new(key.get(), nullptr));
  auto out = SecretBuffer::allocate(kX25519KeySize);
  if (!out.is_ok()) return out.status();
  size_t len = kX25519KeySize;
  if (!ctx || EVP_PKEY_derive_init(ctx.get()) != 1 ||
      EVP_PKEY_derive_set_peer(ctx.get(), peer.get()) != 1) {
    return crypto_error("X25519 derive setup");
  }
  // OpenSSL refuses an all-zero result (a low-order peer point) here.
  if (EVP_PKEY_derive(ctx.get(), out->data(), &len) != 1 || len != kX25519KeySize) {
    return Status::error(ErrorKind::kInvalidArgument, "X25519: invalid peer public key");
  }
  return std::move(out).value();
}

Result<std::string> certificate_sha256_fingerprint(std::string_view pem) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), BIO_free);
  if (!bio) return crypto_error("BIO_new_mem_buf");
  std::unique_ptr<X509, decltype(&X509_free)> cert(
      PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr), X509_free);
  if (!cert) return Status::error(ErrorKind::kInvalidArgument, "not a PEM certificate");
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (X509_digest(cert.get(), EVP_sha256(), md, &len) != 1) return crypto_error("X509_digest");
  return hex_encode(md, len);
}

std::string openssl_last_error() {
  unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "unknown error";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  return buf;
}

}  // namespace keygate
