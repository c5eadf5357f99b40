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

#include "core/json.h"

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

std::string openssl_error() {
  unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "unknown error";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  return buf;
}


// A minimal, bounded BER reader for the strict shape check below.
struct Tlv {
  uint8_t tag = 0;
  const uint8_t* content = nullptr;  // primitive content
  size_t length = 0;
  std::vector<Tlv> children;  // constructed
};

constexpr int kMaxDepth = 12;
constexpr size_t kMaxNodes = 256;

bool read_tlv(const uint8_t* data, size_t size, size_t& pos, int depth, size_t& nodes, Tlv& out);

bool read_children(const uint8_t* data, size_t end, size_t& pos, bool indefinite, int depth,
                   size_t& nodes, std::vector<Tlv>& children) {
  while (true) {
    if (indefinite) {
      if (pos + 2 > end) return false;
      if (data[pos] == 0 && data[pos + 1] == 0) {
        pos += 2;
        return true;
      }
    } else if (pos == end) {
      return true;
    }
    Tlv child;
    if (!read_tlv(data, end, pos, depth + 1, nodes, child)) return false;
    children.push_back(std::move(child));
  }
}

bool read_tlv(const uint8_t* data, size_t size, size_t& pos, int depth, size_t& nodes, Tlv& out) {
  if (depth > kMaxDepth || ++nodes > kMaxNodes || pos + 2 > size) return false;
  out.tag = data[pos++];
  if ((out.tag & 0x1f) == 0x1f || out.tag == 0) return false;  // no multi-byte tags, no EOC here
  const bool constructed = (out.tag & 0x20) != 0;
  uint8_t first = data[pos++];
  if (first == 0x80) {
    if (!constructed) return false;
    return read_children(data, size, pos, true, depth, nodes, out.children);
  }
  size_t length = first;
  if (first & 0x80) {
    int n = first & 0x7f;
    if (n == 0 || n > 3 || pos + n > size) return false;
    length = 0;
    for (int i = 0; i < n; ++i) length = (length << 8) | data[pos++];
  }
  if (length > size - pos) return false;
  if (!constructed) {
    out.content = data + pos;
    out.length = length;
    pos += length;
    return true;
  }
  size_t end = pos + length;
  if (!read_children(data, end, pos, false, depth, nodes, out.children)) return false;
  return pos == end;
}

bool is_primitive(const Tlv& t, uint8_t tag, std::initializer_list<uint8_t> value) {
  return t.tag == tag && t.children.empty() && t.length == value.size() &&
         std::equal(value.begin(), value.end(), t.content);
}

constexpr std::initializer_list<uint8_t> kOidSignedData = {0x2a, 0x86, 0x48, 0x86, 0xf7,
                                                           0x0d, 0x01, 0x07, 0x02};
constexpr std::initializer_list<uint8_t> kOidData = {0x2a, 0x86, 0x48, 0x86, 0xf7,
                                                     0x0d, 0x01, 0x07, 0x01};
constexpr std::initializer_list<uint8_t> kOidSha256 = {0x60, 0x86, 0x48, 0x01, 0x65,
                                                       0x03, 0x04, 0x02, 0x01};
constexpr std::initializer_list<uint8_t> kOidRsa = {0x2a, 0x86, 0x48, 0x86, 0xf7,
                                                    0x0d, 0x01, 0x01, 0x01};
constexpr std::initializer_list<uint8_t> kOidSha256Rsa = {0x2a, 0x86, 0x48, 0x86, 0xf7,
                                                          0x0d, 0x01, 0x01, 0x0b};

// AlgorithmIdentifier: the OID, then nothing or an exact NULL.
bool is_algorithm(const Tlv& t, std::initializer_list<std::initializer_list<uint8_t>> oids) {
  if (t.tag != 0x30 || t.children.empty() || t.children.size() > 2) return false;
  bool oid_ok = false;
  for (const auto& oid : oids) oid_ok = oid_ok || is_primitive(t.children[0], 0x06, oid);
  return oid_ok && (t.children.size() == 1 || is_primitive(t.children[1], 0x05, {}));
}

// The signature covers the document and the signed attributes; OpenSSL
// ignores the rest (versions, content type, algorithm parameters, how the
// content is chunked). So the whole structure must be exactly the shape AWS
// produces, and any byte outside the signed parts that differs is refused:
//   ContentInfo { signedData, [0] SignedData { 1, {sha256}, { data, [0] OCTETs },
//                 { SignerInfo { 1, issuerAndSerial, sha256, [0] attrs,
//                                rsa[WithSHA256], signature } } } }
Status check_cms_shape(const Bytes& der) {
  Tlv root;
  size_t pos = 0, nodes = 0;
  if (!read_tlv(der.data(), der.size(), pos, 0, nodes, root) || pos != der.size()) {
    return Status::error(ErrorKind::kInvalidArgument, "AWS signature: malformed encoding");
  }
  auto bad = [](const char* what) {
    return Status::error(ErrorKind::kIntegrity, str_cat("AWS signature: unexpected ", what));
  };
  if (root.tag != 0x30 || root.children.size() != 2 ||
      !is_primitive(root.children[0], 0x06, kOidSignedData) || root.children[1].tag != 0xa0 ||
      root.children[1].children.size() != 1) {
    return bad("content info");
  }
  const Tlv& sd = root.children[1].children[0];
  if (sd.tag != 0x30 || sd.children.size() != 4) return bad("signed data layout");
  if (!is_primitive(sd.children[0], 0x02, {0x01})) return bad("signed data version");
  const Tlv& digests = sd.children[1];
  if (digests.tag != 0x31 || digests.children.size() != 1 ||
      !is_algorithm(digests.children[0], {kOidSha256})) {
    return bad("digest algorithms");
  }
  const Tlv& encap = sd.children[2];
  if (encap.tag != 0x30 || encap.children.size() != 2 ||
      !is_primitive(encap.children[0], 0x06, kOidData) || encap.children[1].tag != 0xa0 ||
      encap.children[1].children.size() != 1) {
    return bad("encapsulated content");
  }
  const Tlv& octets = encap.children[1].children[0];
  if (octets.tag == 0x24) {
    for (const Tlv& chunk : octets.children) {
      if (chunk.tag != 0x04) return bad("content chunk");
    }
  } else if (octets.tag != 0x04) {
    return bad("content type");
  }
  const Tlv& signers = sd.children[3];
  if (signers.tag != 0x31 || signers.children.size() != 1) return bad("signer count");
  const Tlv& si = signers.children[0];
  if (si.tag != 0x30 || si.children.size() != 6) return bad("signer info layout");
  if (!is_primitive(si.children[0], 0x02, {0x01})) return bad("signer info version");
  if (si.children[1].tag != 0x30) return bad("signer identifier");
  if (!is_algorithm(si.children[2], {kOidSha256})) return bad("signer digest algorithm");
  if (si.children[3].tag != 0xa0) return bad("signed attributes");
  if (!is_algorithm(si.children[4], {kOidRsa, kOidSha256Rsa})) return bad("signature algorithm");
  if (si.children[5].tag != 0x04) return bad("signature value");
  return Status::ok();
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
  KEYGATE_RETURN_IF_ERROR(check_cms_shape(pkcs7_der));
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
                         str_cat("AWS signature does not verify: ", openssl_error()));
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

}  // namespace keygate::server
