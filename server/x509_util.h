// The few X.509 operations the server's own CAs need (the TLS CA and the
// admin CA): P-256 keys, certificates signed by an issuer, PEM both ways.
#pragma once

#include <openssl/evp.h>
#include <openssl/x509.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/secret.h"
#include "core/status.h"

namespace keygate::server {

struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
using OwnedPkey = std::unique_ptr<EVP_PKEY, PkeyFree>;
using OwnedX509 = std::unique_ptr<X509, X509Free>;

OwnedPkey generate_p256();

// Adds the extension `nid` with OpenSSL's config `value` ("critical,CA:TRUE").
Status add_ext(X509* cert, X509* issuer, int nid, const std::string& value);

// A version-3 certificate for `key` with a random 127-bit serial, the
// subject's entries in order ({"O", "keygate"}, {"CN", ...}), valid from an
// hour ago for `days`, its issuer `issuer`'s subject (null: self-issued).
// Not yet signed.
Result<OwnedX509> make_cert(EVP_PKEY* key, const std::vector<std::pair<std::string, std::string>>& subject,
                            X509* issuer, long days);

std::string pem_of_cert(X509* cert);
Result<SecretBuffer> pem_of_key(EVP_PKEY* key);
std::string public_pem_of_key(EVP_PKEY* key);

// The first certificate / private key in PEM text.
Result<OwnedX509> cert_from_pem(std::string_view pem);
Result<OwnedPkey> key_from_pem(const SecretBuffer& pem);
// A PEM public key ("-----BEGIN PUBLIC KEY-----"), as a client sends it.
Result<OwnedPkey> public_key_from_pem(std::string_view pem);

// The serial number in lower-case hex, and one entry of the subject ("" if absent).
std::string serial_hex(X509* cert);
std::string subject_entry(X509* cert, int nid);

}  // namespace keygate::server
