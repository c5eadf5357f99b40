// Test keys and certificates for the metadata emulator: generated once per
// state folder (private keys 0600), reloaded on later runs.
#pragma once

#include <openssl/evp.h>
#include <openssl/x509.h>

#include <string>
#include <vector>

#include "core/encoding.h"
#include "core/status.h"

namespace keygate::emulator {

struct Signer {
  Signer() = default;
  Signer(const Signer&) = delete;
  Signer& operator=(const Signer&) = delete;
  Signer(Signer&& o) noexcept : key(o.key), cert(o.cert) {
    o.key = nullptr;
    o.cert = nullptr;
  }
  Signer& operator=(Signer&& o) noexcept {
    std::swap(key, o.key);
    std::swap(cert, o.cert);
    return *this;
  }
  ~Signer() {
    EVP_PKEY_free(key);
    X509_free(cert);
  }
  EVP_PKEY* key = nullptr;
  X509* cert = nullptr;
};

struct CertSpec {
  std::vector<std::pair<std::string, std::string>> subject;  // {"CN", "..."}
  bool ca = false;
  std::vector<std::string> dns_names;  // subjectAltName
  bool tls_usage = false;              // EKU serverAuth, clientAuth
};

// Loads KEY_PATH + CERT_PATH, or creates an RSA-2048 key and a certificate
// for `spec`, issued by `issuer` (self-signed when null), valid from a day
// ago for ten years. Creates missing folders.
Result<Signer> load_or_create_signer(const std::string& key_path, const std::string& cert_path,
                                     const CertSpec& spec, const Signer* issuer);

std::string certificate_pem(X509* cert);

// CMS SignedData over `content`, embedded, SHA-256. `flags` are CMS_* flags
// (CMS_NOCERTS, CMS_NOATTR ...) added to CMS_BINARY | CMS_NOSMIMECAP.
Result<Bytes> cms_sign(const Signer& signer, const std::string& content, unsigned int flags);

// RSASSA-PKCS1-v1_5 with SHA-256 over `data`.
Result<Bytes> rs256_sign(EVP_PKEY* key, std::string_view data);

}  // namespace keygate::emulator
