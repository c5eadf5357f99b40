#include "server/x509_util.h"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "core/crypto.h"
#include "core/encoding.h"

namespace keygate::server {
namespace {

using OwnedBio = std::unique_ptr<BIO, decltype(&BIO_free)>;

OwnedBio bio_of(std::string_view text) {
  return OwnedBio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())), BIO_free);
}

}  // namespace

OwnedPkey generate_p256() { return OwnedPkey(EVP_EC_gen("P-256")); }

Status add_ext(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
  if (ext == nullptr) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("certificate extension '", value, "' is invalid"));
  }
  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  return Status::ok();
}

Result<OwnedX509> make_cert(EVP_PKEY* key, const std::vector<std::pair<std::string, std::string>>& subject,
                            X509* issuer, long days) {
  OwnedX509 cert(X509_new());
  if (!cert) return Status::error(ErrorKind::kInternal, "X509_new");
  X509_set_version(cert.get(), 2);
  Bytes serial = random_bytes(16);
  serial[0] &= 0x7f;
  serial[0] |= 0x40;  // always 16 bytes, so always 32 hex digits
  BIGNUM* bn = BN_bin2bn(serial.data(), static_cast<int>(serial.size()), nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert.get()));
  BN_free(bn);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), days * 24 * 3600);
  X509_set_pubkey(cert.get(), key);
  X509_NAME* name = X509_get_subject_name(cert.get());
  for (const auto& [field, value] : subject) {
    if (X509_NAME_add_entry_by_txt(name, field.c_str(), MBSTRING_UTF8,
                                   reinterpret_cast<const unsigned char*>(value.c_str()), -1, -1, 0) != 1) {
      return Status::error(ErrorKind::kInvalidArgument, str_cat("certificate subject ", field, " is invalid"));
    }
  }
  X509_set_issuer_name(cert.get(), issuer ? X509_get_subject_name(issuer) : name);
  return cert;
}

std::string pem_of_cert(X509* cert) {
  OwnedBio bio(BIO_new(BIO_s_mem()), BIO_free);
  PEM_write_bio_X509(bio.get(), cert);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

Result<SecretBuffer> pem_of_key(EVP_PKEY* key) {
  OwnedBio bio(BIO_new(BIO_s_secmem()), BIO_free);
  if (!bio) bio.reset(BIO_new(BIO_s_mem()));
  PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return SecretBuffer::copy_of(data, static_cast<size_t>(len));
}

std::string public_pem_of_key(EVP_PKEY* key) {
  OwnedBio bio(BIO_new(BIO_s_mem()), BIO_free);
  PEM_write_bio_PUBKEY(bio.get(), key);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

Result<OwnedX509> cert_from_pem(std::string_view pem) {
  OwnedBio bio = bio_of(pem);
  OwnedX509 cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) return Status::error(ErrorKind::kInvalidArgument, "not a PEM certificate");
  return cert;
}

Result<OwnedPkey> key_from_pem(const SecretBuffer& pem) {
  OwnedBio bio = bio_of(std::string_view(reinterpret_cast<const char*>(pem.data()), pem.size()));
  OwnedPkey key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key) return Status::error(ErrorKind::kInvalidArgument, "not a PEM private key");
  return key;
}

Result<OwnedPkey> public_key_from_pem(std::string_view pem) {
  OwnedBio bio = bio_of(pem);
  OwnedPkey key(PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr));
  if (!key) return Status::error(ErrorKind::kInvalidArgument, "not a PEM public key");
  return key;
}

std::string serial_hex(X509* cert) {
  BIGNUM* bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), nullptr);
  if (bn == nullptr) return "";
  Bytes raw(static_cast<size_t>(BN_num_bytes(bn)));
  BN_bn2bin(bn, raw.data());
  BN_free(bn);
  return hex_encode(raw);
}

std::string subject_entry(X509* cert, int nid) {
  X509_NAME* name = X509_get_subject_name(cert);
  const int at = X509_NAME_get_index_by_NID(name, nid, -1);
  if (at < 0) return "";
  ASN1_STRING* data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, at));
  unsigned char* utf8 = nullptr;
  const int n = ASN1_STRING_to_UTF8(&utf8, data);
  if (n < 0) return "";
  std::string out(reinterpret_cast<char*>(utf8), static_cast<size_t>(n));
  OPENSSL_free(utf8);
  return out;
}

}  // namespace keygate::server
