#include "server/aws_identity.h"

#include <dirent.h>
#include <openssl/bio.h>
#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "core/crypto.h"
#include "core/json.h"
#include "server/cms_shape.h"

namespace keygate::server {
namespace {

constexpr size_t kMaxPkcs7Size = 8 * 1024;
constexpr size_t kMaxDocumentSize = 4 * 1024;

struct X509Deleter {
  void operator()(X509* x) const { X509_free(x); }
};
using X509Ptr = std::unique_ptr<X509, X509Deleter>;

bool is_region_name(std::string_view r) {
  if (r.empty() || r.size() > 32) return false;
  for (char c : r) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) return false;
  }
  return true;
}

}  // namespace

struct AwsTrustStore::Impl {
  std::map<std::string, std::vector<X509Ptr>> by_region;
};

AwsTrustStore::AwsTrustStore() : impl_(std::make_unique<Impl>()) {}
AwsTrustStore::~AwsTrustStore() = default;
AwsTrustStore::AwsTrustStore(AwsTrustStore&&) noexcept = default;
AwsTrustStore& AwsTrustStore::operator=(AwsTrustStore&&) noexcept = default;

Status AwsTrustStore::add_pem(const std::string& region, std::string_view pem) {
  if (!is_region_name(region)) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("bad region name '", region, "'"));
  }
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), BIO_free);
  size_t added = 0;
  while (true) {
    X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr);
    if (cert == nullptr) break;
    impl_->by_region[region].emplace_back(cert);
    ++added;
  }
  ERR_clear_error();
  if (added == 0) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("no PEM certificate for region ", region));
  }
  return Status::ok();
}

Status AwsTrustStore::add_directory(const std::string& dir) {
  struct DirCloser {
    void operator()(DIR* p) const { closedir(p); }
  };
  std::unique_ptr<DIR, DirCloser> d(opendir(dir.c_str()));
  if (!d) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("open trust folder ", dir));
  }
  size_t files = 0;
  while (dirent* e = readdir(d.get())) {
    std::string name = e->d_name;
    if (name.size() <= 4 || name.substr(name.size() - 4) != ".pem") continue;
    std::ifstream in(dir + "/" + name);
    std::stringstream ss;
    ss << in.rdbuf();
    Status s = add_pem(name.substr(0, name.size() - 4), ss.str());
    if (!s.is_ok()) return s.with_context(dir + "/" + name);
    ++files;
  }
  if (files == 0) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("trust folder ", dir, " holds no <region>.pem file"));
  }
  return Status::ok();
}

size_t AwsTrustStore::region_count() const { return impl_->by_region.size(); }

size_t AwsTrustStore::certificate_count() const {
  size_t n = 0;
  for (const auto& [region, certs] : impl_->by_region) n += certs.size();
  return n;
}

Result<AwsIdentity> parse_aws_identity_document(std::string_view document) {
  auto obj = parse_json_object(document, kMaxDocumentSize);
  if (!obj.is_ok()) return obj.status().with_context("identity document");
  AwsIdentity id;
  struct Field {
    const char* key;
    std::string* out;
    bool required;
  } fields[] = {
      {"accountId", &id.account_id, true},       {"region", &id.region, true},
      {"instanceId", &id.instance_id, true},     {"imageId", &id.image_id, true},
      {"availabilityZone", &id.availability_zone, false},
      {"instanceType", &id.instance_type, false}, {"architecture", &id.architecture, false},
      {"pendingTime", &id.pending_time, false},
  };
  for (const Field& f : fields) {
    auto v = f.required ? json_string(obj.value(), f.key, 128)
                        : json_optional_string(obj.value(), f.key, 128);
    if (!v.is_ok()) return v.status().with_context("identity document");
    *f.out = std::move(v).value();
  }
  if (id.account_id.empty() || id.region.empty() || id.instance_id.empty()) {
    return Status::error(ErrorKind::kInvalidArgument, "identity document: empty identity field");
  }
  return id;
}

Result<AwsIdentity> verify_aws_identity(const Bytes& pkcs7_der, const AwsTrustStore& trust,
                                        const Clock& clock) {
  if (pkcs7_der.empty() || pkcs7_der.size() > kMaxPkcs7Size) {
    return Status::error(ErrorKind::kInvalidArgument, "AWS signature: empty or too large");
  }
  // AWS's exact shape: signed attributes, no certificates, SHA-256.
  static const CmsShape kAwsShape{"AWS signature", true, false, {kOidSha256},
                                  {kOidRsaEncryption, kOidSha256WithRsa}};
  KEYGATE_RETURN_IF_ERROR(check_cms_shape(pkcs7_der, kAwsShape));
  std::unique_ptr<BIO, decltype(&BIO_free)> in(
      BIO_new_mem_buf(pkcs7_der.data(), static_cast<int>(pkcs7_der.size())), BIO_free);
  std::unique_ptr<CMS_ContentInfo, decltype(&CMS_ContentInfo_free)> cms(
      d2i_CMS_bio(in.get(), nullptr), CMS_ContentInfo_free);
  if (!cms) {
    ERR_clear_error();
    return Status::error(ErrorKind::kInvalidArgument, "AWS signature: not a CMS structure");
  }
  if (OBJ_obj2nid(CMS_get0_type(cms.get())) != NID_pkcs7_signed) {
    return Status::error(ErrorKind::kInvalidArgument, "AWS signature: not SignedData");
  }
  ASN1_OCTET_STRING** content = CMS_get0_content(cms.get());
  if (content == nullptr || *content == nullptr || (*content)->length <= 0 ||
      static_cast<size_t>((*content)->length) > kMaxDocumentSize) {
    return Status::error(ErrorKind::kInvalidArgument, "AWS signature: no embedded document");
  }
  // Read the claimed region (unauthenticated) only to pick the certificates.
  std::string_view claimed(reinterpret_cast<const char*>((*content)->data),
                           static_cast<size_t>((*content)->length));
  auto unverified = parse_aws_identity_document(claimed);
  if (!unverified.is_ok()) return unverified.status();
  auto it = trust.impl().by_region.find(unverified->region);
  if (it == trust.impl().by_region.end()) {
    return Status::error(ErrorKind::kIntegrity,
                         str_cat("AWS signature: no trusted certificate for region '",
                                 unverified->region, "'"));
  }

  std::unique_ptr<X509_STORE, decltype(&X509_STORE_free)> store(X509_STORE_new(),
                                                                X509_STORE_free);
  std::unique_ptr<STACK_OF(X509), void (*)(STACK_OF(X509)*)> certs(
      sk_X509_new_null(), [](STACK_OF(X509)* s) { sk_X509_free(s); });
  for (const auto& cert : it->second) {
    X509_STORE_add_cert(store.get(), cert.get());
    sk_X509_push(certs.get(), cert.get());
  }
  X509_VERIFY_PARAM* param = X509_STORE_get0_param(store.get());
  X509_VERIFY_PARAM_set_time(param, static_cast<time_t>(clock.now_unix()));
  X509_VERIFY_PARAM_set_purpose(param, X509_PURPOSE_ANY);
  X509_VERIFY_PARAM_set_flags(param, X509_V_FLAG_PARTIAL_CHAIN);

  std::unique_ptr<BIO, decltype(&BIO_free)> out(BIO_new(BIO_s_mem()), BIO_free);
  // CMS_NOINTERN: only the region's certificates may sign, never one carried
  // inside the message.
  if (CMS_verify(cms.get(), certs.get(), store.get(), nullptr, out.get(),
                 CMS_BINARY | CMS_NOINTERN) != 1) {
    return Status::error(ErrorKind::kIntegrity,
                         str_cat("AWS signature does not verify: ", openssl_last_error()));
  }
  char* data = nullptr;
  long len = BIO_get_mem_data(out.get(), &data);
  if (len <= 0) return Status::error(ErrorKind::kIntegrity, "AWS signature: empty content");
  auto verified = parse_aws_identity_document(std::string_view(data, static_cast<size_t>(len)));
  if (!verified.is_ok()) return verified.status();
  if (verified->region != unverified->region) {
    return Status::error(ErrorKind::kIntegrity, "AWS signature: region changed under signature");
  }
  return verified;
}

Identity to_identity(const AwsIdentity& id) {
  Identity out;
  out.platform = "aws";
  out.claims = {{"account_id", id.account_id},       {"region", id.region},
                {"availability_zone", id.availability_zone}, {"image_id", id.image_id},
                {"instance_id", id.instance_id},     {"instance_type", id.instance_type},
                {"architecture", id.architecture}};
  return out;
}

}  // namespace keygate::server
