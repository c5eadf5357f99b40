// OpenSSL public keys from raw components (JWKs, TPM public areas).
#pragma once

#include <openssl/evp.h>

#include <memory>

#include "core/encoding.h"
#include "core/status.h"

namespace keygate {

struct PkeyDeleter {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyDeleter>;

// RSA public key from big-endian modulus and exponent; the modulus must be
// 2048 to 8192 bits.
Result<PkeyPtr> rsa_public_key(const Bytes& n, const Bytes& e);
// EC public key on `group` ("P-256", "P-384") from affine coordinates.
Result<PkeyPtr> ec_public_key(const char* group, const Bytes& x, const Bytes& y);

}  // namespace keygate
