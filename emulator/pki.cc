#include "emulator/pki.h"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/cms.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <memory>

#include "core/crypto.h"
#include "core/file.h"

namespace keygate::emulator {
namespace {

std::string dirname_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

std::string bio_text(BIO* bio) {
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  return std::string(data, static_cast<size_t>(len));
}

void add_extension(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
  if (ext != nullptr) {
    X509_add_ext(cert, ext, -1);
    X509_EXTENSION_free(ext);
  }
}

}  // namespace

std::string certificate_pem(X509* cert) {
  std::unique_ptr<BIO, decltype(&BIO_free)> b(BIO_new(BIO_s_mem()), BIO_free);
  PEM_write_bio_X509(b.get(), cert);
  return bio_text(b.get());
}

Result<Signer> load_or_create_signer(const std::string& key_path, const std::string& cert_path,
                                     const CertSpec& spec, const Signer* issuer) {
  KEYGATE_RETURN_IF_ERROR(ensure_state_dir(dirname_of(key_path)));
  mkdir(dirname_of(cert_path).c_str(), 0755);
  Signer s;
  if (FILE* kf = fopen(key_path.c_str(), "r")) {
    s.key = PEM_read_PrivateKey(kf, nullptr, nullptr, nullptr);
    fclose(kf);
    if (FILE* cf = fopen(cert_path.c_str(), "r")) {
      s.cert = PEM_read_X509(cf, nullptr, nullptr, nullptr);
      fclose(cf);
    }
    if (s.key && s.cert) return s;
    return Status::error(ErrorKind::kIo, str_cat("unreadable test signer ", key_path));
  }
  s.key = EVP_RSA_gen(2048);
  s.cert = X509_new();
  if (s.key == nullptr || s.cert == nullptr) {
    return Status::error(ErrorKind::kInternal, "cannot generate a test key");
  }
  X509_set_version(s.cert, 2);
  Bytes serial = random_bytes(8);
  serial[0] &= 0x7f;
  BIGNUM* bn = BN_bin2bn(serial.data(), static_cast<int>(serial.size()), nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(s.cert));
  BN_free(bn);
  X509_gmtime_adj(X509_getm_notBefore(s.cert), -86400);
  X509_gmtime_adj(X509_getm_notAfter(s.cert), 3650L * 86400);
  X509_set_pubkey(s.cert, s.key);
  X509_NAME* name = X509_get_subject_name(s.cert);
  for (const auto& [field, value] : spec.subject) {
    X509_NAME_add_entry_by_txt(name, field.c_str(), MBSTRING_ASC,
                               reinterpret_cast<const unsigned char*>(value.c_str()), -1, -1, 0);
  }
  X509* issuer_cert = issuer != nullptr ? issuer->cert : s.cert;
  X509_set_issuer_name(s.cert, X509_get_subject_name(issuer_cert));
  if (spec.ca) {
    add_extension(s.cert, issuer_cert, NID_basic_constraints, "critical,CA:TRUE");
    add_extension(s.cert, issuer_cert, NID_key_usage, "critical,keyCertSign,cRLSign,digitalSignature");
  } else {
    add_extension(s.cert, issuer_cert, NID_key_usage, "critical,digitalSignature,keyEncipherment");
  }
  if (spec.tls_usage) add_extension(s.cert, issuer_cert, NID_ext_key_usage, "serverAuth,clientAuth");
  if (!spec.dns_names.empty()) {
    std::string san;
    for (const auto& d : spec.dns_names) san += (san.empty() ? "DNS:" : ",DNS:") + d;
    add_extension(s.cert, issuer_cert, NID_subject_alt_name, san);
  }
  add_extension(s.cert, issuer_cert, NID_subject_key_identifier, "hash");
  if (issuer != nullptr) add_extension(s.cert, issuer_cert, NID_authority_key_identifier, "keyid");
  if (X509_sign(s.cert, issuer != nullptr ? issuer->key : s.key, EVP_sha256()) <= 0) {
    return Status::error(ErrorKind::kInternal, "cannot sign a test certificate");
  }
  std::unique_ptr<BIO, decltype(&BIO_free)> kb(BIO_new(BIO_s_mem()), BIO_free);
  PEM_write_bio_PrivateKey(kb.get(), s.key, nullptr, nullptr, 0, nullptr, nullptr);
  KEYGATE_RETURN_IF_ERROR(write_file_atomically(key_path, bio_text(kb.get()), 0600));
  KEYGATE_RETURN_IF_ERROR(write_file_atomically(cert_path, certificate_pem(s.cert), 0644));
  return s;
}

Result<Bytes> cms_sign(const Signer& signer, const std::string& content, unsigned int flags) {
  std::unique_ptr<BIO, decltype(&BIO_free)> in(
      BIO_new_mem_buf(content.data(), static_cast<int>(content.size())), BIO_free);
  std::unique_ptr<CMS_ContentInfo, decltype(&CMS_ContentInfo_free)> cms(
      CMS_sign(signer.cert, signer.key, nullptr, in.get(), CMS_BINARY | CMS_NOSMIMECAP | flags),
      CMS_ContentInfo_free);
  if (!cms) return Status::error(ErrorKind::kInternal, "CMS_sign failed");
  std::unique_ptr<BIO, decltype(&BIO_free)> out(BIO_new(BIO_s_mem()), BIO_free);
  i2d_CMS_bio(out.get(), cms.get());
  std::string der = bio_text(out.get());
  return Bytes(der.begin(), der.end());
}

Result<Bytes> rs256_sign(EVP_PKEY* key, std::string_view data) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> md(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_PKEY_CTX* pctx = nullptr;
  size_t len = 0;
  if (!md || EVP_DigestSignInit(md.get(), &pctx, EVP_sha256(), nullptr, key) != 1 ||
      EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PADDING) != 1 ||
      EVP_DigestSign(md.get(), nullptr, &len, reinterpret_cast<const unsigned char*>(data.data()),
                     data.size()) != 1) {
    return Status::error(ErrorKind::kInternal, "RS256 signing failed");
  }
  Bytes sig(len);
  if (EVP_DigestSign(md.get(), sig.data(), &len, reinterpret_cast<const unsigned char*>(data.data()),
                     data.size()) != 1) {
    return Status::error(ErrorKind::kInternal, "RS256 signing failed");
  }
  sig.resize(len);
  return sig;
}

}  // namespace keygate::emulator
