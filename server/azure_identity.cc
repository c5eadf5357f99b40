#include "server/azure_identity.h"

#include <dirent.h>
#include <openssl/bio.h>
#include <openssl/cms.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include <vector>

#include "core/crypto.h"
#include "core/file.h"
#include "core/json.h"
#include "server/cms_shape.h"

namespace keygate::server {
namespace {

constexpr size_t kMaxPkcs7Size = 12 * 1024;
constexpr size_t kMaxDocumentSize = 4 * 1024;
constexpr size_t kMaxPemFile = 256 * 1024;

struct X509Deleter {
  void operator()(X509* x) const { X509_free(x); }
};
using X509Ptr = std::unique_ptr<X509, X509Deleter>;

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

bool is_self_signed(X509* cert) {
  return X509_check_issued(cert, cert) == X509_V_OK;
}

std::string common_name(X509* cert) {
  X509_NAME* name = X509_get_subject_name(cert);
  int idx = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
  if (idx < 0 || X509_NAME_get_index_by_NID(name, NID_commonName, idx) >= 0) return "";
  ASN1_STRING* data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, idx));
  unsigned char* utf8 = nullptr;
  int len = ASN1_STRING_to_UTF8(&utf8, data);
  if (len < 0) return "";
  std::string out(reinterpret_cast<char*>(utf8), static_cast<size_t>(len));
  OPENSSL_free(utf8);
  if (out.find('\0') != std::string::npos) return "";
  return out;
}

}  // namespace

bool is_azure_metadata_name(std::string_view name) {
  static constexpr std::string_view kSuffixes[] = {"metadata.azure.com", "metadata.azure.us",
                                                   "metadata.azure.cn",
                                                   "metadata.microsoftazure.de"};
  if (name.empty() || name.size() > 253) return false;
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.';
    if (!ok) return false;
  }
  for (std::string_view suffix : kSuffixes) {
    if (name == suffix) return true;
    // "(.*\.)?" : any non-empty label sequence before a dot.
    if (name.size() > suffix.size() + 1 && ends_with(name, suffix) &&
        name[name.size() - suffix.size() - 1] == '.') {
      return true;
    }
  }
  return false;
}

Result<int64_t> parse_azure_timestamp(std::string_view text) {
  // MM/DD/YY hh:mm:ss +hhmm
  auto bad = [&text]() {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("Azure document: malformed timestamp '", text.substr(0, 32), "'"));
  };
  if (text.size() != 23) return bad();
  const char* pattern = "dd/dd/dd dd:dd:dd sdddd";
  for (size_t i = 0; i < text.size(); ++i) {
    char p = pattern[i], c = text[i];
    if (p == 'd' ? !(c >= '0' && c <= '9') : p == 's' ? !(c == '+' || c == '-') : c != p) {
      return bad();
    }
  }
  auto num = [&text](size_t pos) { return (text[pos] - '0') * 10 + (text[pos + 1] - '0'); };
  struct tm tm{};
  tm.tm_mon = num(0) - 1;
  tm.tm_mday = num(3);
  tm.tm_year = 100 + num(6);
  tm.tm_hour = num(9);
  tm.tm_min = num(12);
  tm.tm_sec = num(15);
  if (tm.tm_mon < 0 || tm.tm_mon > 11 || tm.tm_mday < 1 || tm.tm_mday > 31 || tm.tm_hour > 23 ||
      tm.tm_min > 59 || tm.tm_sec > 60) {
    return bad();
  }
  int offset_minutes = num(19) * 60 + num(21);
  if (offset_minutes > 14 * 60) return bad();
  int64_t t = timegm(&tm);
  return text[18] == '-' ? t + offset_minutes * 60 : t - offset_minutes * 60;
}

struct AzureTrustStore::Impl {
  std::vector<X509Ptr> roots;
  std::vector<X509Ptr> intermediates;
};

AzureTrustStore::AzureTrustStore() : impl_(std::make_unique<Impl>()) {}
AzureTrustStore::~AzureTrustStore() = default;
AzureTrustStore::AzureTrustStore(AzureTrustStore&&) noexcept = default;
AzureTrustStore& AzureTrustStore::operator=(AzureTrustStore&&) noexcept = default;

size_t AzureTrustStore::root_count() const { return impl_->roots.size(); }
size_t AzureTrustStore::intermediate_count() const { return impl_->intermediates.size(); }

Status AzureTrustStore::add_pem(std::string_view pem, const std::string& origin) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), BIO_free);
  size_t added = 0;
  while (X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
    (is_self_signed(cert) ? impl_->roots : impl_->intermediates).emplace_back(cert);
    ++added;
  }
  openssl_last_error();  // the end-of-input "no start line"
  if (added == 0) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat(origin, ": no PEM certificate"));
  }
  return Status::ok();
}

Status AzureTrustStore::add_directory(const std::string& dir) {
  struct DirCloser {
    void operator()(DIR* p) const { closedir(p); }
  };
  std::unique_ptr<DIR, DirCloser> d(opendir(dir.c_str()));
  if (!d) return Status::error(ErrorKind::kInvalidArgument, str_cat("open Azure trust folder ", dir));
  size_t files = 0;
  while (dirent* e = readdir(d.get())) {
    std::string name = e->d_name;
    if (!ends_with(name, ".pem") && !ends_with(name, ".crt")) continue;
    auto text = read_small_file(dir + "/" + name, kMaxPemFile);
    if (!text.is_ok()) return text.status();
    KEYGATE_RETURN_IF_ERROR(add_pem(text.value(), dir + "/" + name));
    ++files;
  }
  if (files == 0 || impl_->roots.empty()) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("Azure trust folder ", dir, " holds no root certificate (*.pem)"));
  }
  return Status::ok();
}

Result<Identity> verify_azure_attested_document(const Bytes& pkcs7_der,
                                                const AzureTrustStore& trust, const Clock& clock,
                                                const AzureDocumentCheck& check) {
  if (pkcs7_der.empty() || pkcs7_der.size() > kMaxPkcs7Size) {
    return Status::error(ErrorKind::kInvalidArgument, "Azure signature: empty or too large");
  }
  if (trust.impl().roots.empty()) {
    return Status::error(ErrorKind::kIntegrity, "Azure signature: no Azure root is trusted");
  }
  // Azure's shape: no signed attributes, the signer's certificate embedded,
  // SHA-256 (named by the sha256WithRSAEncryption OID as digest algorithm).
  static const CmsShape kAzureShape{"Azure signature", false, true,
                                    {kOidSha256, kOidSha256WithRsa},
                                    {kOidRsaEncryption, kOidSha256WithRsa}};
  KEYGATE_RETURN_IF_ERROR(check_cms_shape(pkcs7_der, kAzureShape));
  std::unique_ptr<BIO, decltype(&BIO_free)> in(
      BIO_new_mem_buf(pkcs7_der.data(), static_cast<int>(pkcs7_der.size())), BIO_free);
  std::unique_ptr<CMS_ContentInfo, decltype(&CMS_ContentInfo_free)> cms(
      d2i_CMS_bio(in.get(), nullptr), CMS_ContentInfo_free);
  if (!cms) {
    openssl_last_error();
    return Status::error(ErrorKind::kInvalidArgument, "Azure signature: not a CMS structure");
  }
  // The signature first (the signer is the certificate the message
  // carries), then the signer's chain: OpenSSL's CMS_verify would build it
  // only from the message's own certificates.
  std::unique_ptr<BIO, decltype(&BIO_free)> out(BIO_new(BIO_s_mem()), BIO_free);
  if (CMS_verify(cms.get(), nullptr, nullptr, nullptr, out.get(),
                 CMS_BINARY | CMS_NO_SIGNER_CERT_VERIFY) != 1) {
    return Status::error(ErrorKind::kIntegrity,
                         str_cat("Azure signature does not verify: ", openssl_last_error()));
  }
  std::unique_ptr<STACK_OF(X509), void (*)(STACK_OF(X509)*)> signers(
      CMS_get0_signers(cms.get()), [](STACK_OF(X509)* s) { sk_X509_free(s); });
  if (!signers || sk_X509_num(signers.get()) != 1) {
    return Status::error(ErrorKind::kIntegrity, "Azure signature: not exactly one signer");
  }
  X509* leaf = sk_X509_value(signers.get(), 0);
  std::unique_ptr<X509_STORE, decltype(&X509_STORE_free)> store(X509_STORE_new(),
                                                                X509_STORE_free);
  std::unique_ptr<STACK_OF(X509), void (*)(STACK_OF(X509)*)> untrusted(
      sk_X509_new_null(), [](STACK_OF(X509)* s) { sk_X509_free(s); });
  for (const auto& root : trust.impl().roots) X509_STORE_add_cert(store.get(), root.get());
  for (const auto& cert : trust.impl().intermediates) sk_X509_push(untrusted.get(), cert.get());
  std::unique_ptr<X509_STORE_CTX, decltype(&X509_STORE_CTX_free)> ctx(X509_STORE_CTX_new(),
                                                                      X509_STORE_CTX_free);
  if (!store || !untrusted || !ctx ||
      X509_STORE_CTX_init(ctx.get(), store.get(), leaf, untrusted.get()) != 1) {
    return Status::error(ErrorKind::kInternal, "Azure signature: verifier setup failed");
  }
  X509_VERIFY_PARAM* param = X509_STORE_CTX_get0_param(ctx.get());
  X509_VERIFY_PARAM_set_time(param, static_cast<time_t>(clock.now_unix()));
  // The leaf is a TLS certificate (serverAuth/clientAuth), not an S/MIME one.
  X509_VERIFY_PARAM_set_purpose(param, X509_PURPOSE_ANY);
  if (X509_verify_cert(ctx.get()) != 1) {
    int err = X509_STORE_CTX_get_error(ctx.get());
    openssl_last_error();
    return Status::error(ErrorKind::kIntegrity,
                         str_cat("Azure signer certificate does not chain to a trusted root: ",
                                 X509_verify_cert_error_string(err)));
  }
  const std::string signer = common_name(leaf);
  if (!is_azure_metadata_name(signer)) {
    return Status::error(ErrorKind::kIntegrity,
                         str_cat("Azure signature: signer '", signer.substr(0, 64),
                                 "' is not Azure's metadata service"));
  }
  char* data = nullptr;
  long len = BIO_get_mem_data(out.get(), &data);
  if (len <= 0 || static_cast<size_t>(len) > kMaxDocumentSize) {
    return Status::error(ErrorKind::kInvalidArgument, "Azure document: empty or too large");
  }
  auto doc = parse_json_object(std::string_view(data, static_cast<size_t>(len)), kMaxDocumentSize);
  if (!doc.is_ok()) return doc.status().with_context("Azure document");
  const Json::Value& d = doc.value();

  auto nonce = json_string(d, "nonce", 64);
  if (!nonce.is_ok() || nonce.value() != check.nonce) {
    return Status::error(ErrorKind::kRefused,
                         "Azure document: nonce does not carry this challenge's binding (a replay?)");
  }
  const Json::Value& ts = d["timeStamp"];
  auto created_text = json_string(ts, "createdOn", 32);
  auto expires_text = json_string(ts, "expiresOn", 32);
  if (!created_text.is_ok() || !expires_text.is_ok()) {
    return Status::error(ErrorKind::kInvalidArgument, "Azure document: no timeStamp");
  }
  auto created = parse_azure_timestamp(created_text.value());
  auto expires = parse_azure_timestamp(expires_text.value());
  if (!created.is_ok()) return created.status();
  if (!expires.is_ok()) return expires.status();
  const int64_t now = clock.now_unix();
  if (created.value() > now + check.skew_seconds) {
    return Status::error(ErrorKind::kRefused, "Azure document: created in the future (clock skew?)");
  }
  if (now > expires.value() + check.skew_seconds) {
    return Status::error(ErrorKind::kRefused, "Azure document: expired");
  }
  if (now - created.value() > check.max_age_seconds + check.skew_seconds) {
    return Status::error(ErrorKind::kRefused,
                         str_cat("Azure document: created ", now - created.value(),
                                 " s ago (limit ", check.max_age_seconds, " s)"));
  }
  Identity id;
  id.platform = "azure";
  struct Field {
    const char* claim;
    const Json::Value* obj;
    const char* key;
    bool required;
  } fields[] = {
      // Documents of api-version 2018-10-01 carry no subscriptionId; the
      // policy (which always binds it) then refuses them.
      {"subscription_id", &d, "subscriptionId", false},
      {"vm_id", &d, "vmId", true},
      {"sku", &d, "sku", false},
      {"license_type", &d, "licenseType", false},
      {"plan_name", &d["plan"], "name", false},
      {"plan_product", &d["plan"], "product", false},
      {"plan_publisher", &d["plan"], "publisher", false},
  };
  for (const Field& f : fields) {
    auto v = f.required ? json_string(*f.obj, f.key, 128) : json_optional_string(*f.obj, f.key, 128);
    if (!v.is_ok() || (f.required && v->empty())) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("Azure document: missing or malformed '", f.key, "'"));
    }
    if (!v->empty()) id.claims[f.claim] = v.value();
  }
  return id;
}

}  // namespace keygate::server
