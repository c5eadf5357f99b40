#include "server/gcp_identity.h"

#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <sys/stat.h>

#include <map>

#include "core/crypto.h"
#include "core/encoding.h"
#include "core/file.h"
#include "core/json.h"
#include "core/log.h"
#include "core/pkey.h"

namespace keygate::server {
namespace {

constexpr size_t kMaxTokenSize = 8 * 1024;
constexpr size_t kMaxJwksSize = 64 * 1024;
constexpr size_t kMaxKeys = 32;

Result<PkeyPtr> rsa_key_from_jwk(const Json::Value& jwk) {
  auto n_text = json_string(jwk, "n", 2048);
  auto e_text = json_string(jwk, "e", 16);
  if (!n_text.is_ok()) return n_text.status();
  if (!e_text.is_ok()) return e_text.status();
  auto n = base64url_decode(n_text.value());
  auto e = base64url_decode(e_text.value());
  if (!n.is_ok() || !e.is_ok()) {
    return Status::error(ErrorKind::kInvalidArgument, "JWK: malformed n or e");
  }
  auto key = rsa_public_key(n.value(), e.value());
  if (!key.is_ok()) return key.status().with_context("JWK");
  return key;
}

// Splits "a.b.c" into its three base64url parts.
bool split_jws(std::string_view token, std::string_view parts[3]) {
  size_t first = token.find('.');
  if (first == std::string_view::npos) return false;
  size_t second = token.find('.', first + 1);
  if (second == std::string_view::npos || token.find('.', second + 1) != std::string_view::npos) {
    return false;
  }
  parts[0] = token.substr(0, first);
  parts[1] = token.substr(first + 1, second - first - 1);
  parts[2] = token.substr(second + 1);
  return !parts[0].empty() && !parts[1].empty() && !parts[2].empty();
}

Result<Json::Value> decode_json_part(std::string_view part, const char* what) {
  auto raw = base64url_decode(part);
  if (!raw.is_ok()) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("GCP token: ", what, " is not base64url"));
  }
  auto obj = parse_json_object(as_string_view(raw.value()), kMaxTokenSize);
  if (!obj.is_ok()) return obj.status().with_context(str_cat("GCP token ", what));
  return obj;
}

}  // namespace

struct JwkSet::Impl {
  std::map<std::string, PkeyPtr> by_kid;
};

JwkSet::JwkSet() : impl_(std::make_unique<Impl>()) {}
JwkSet::~JwkSet() = default;
JwkSet::JwkSet(JwkSet&&) noexcept = default;
JwkSet& JwkSet::operator=(JwkSet&&) noexcept = default;

size_t JwkSet::size() const { return impl_->by_kid.size(); }

Status JwkSet::add_json(std::string_view jwks) {
  auto doc = parse_json_object(jwks, kMaxJwksSize);
  if (!doc.is_ok()) return doc.status().with_context("JWK set");
  const Json::Value& keys = doc.value()["keys"];
  if (!keys.isArray() || keys.empty() || keys.size() > kMaxKeys) {
    return Status::error(ErrorKind::kInvalidArgument, "JWK set: 'keys' must be a non-empty array");
  }
  size_t added = 0;
  for (const auto& jwk : keys) {
    if (!jwk.isObject()) return Status::error(ErrorKind::kInvalidArgument, "JWK set: key is not an object");
    auto kty = json_string(jwk, "kty", 16);
    auto alg = json_optional_string(jwk, "alg", 16, "RS256");
    auto use = json_optional_string(jwk, "use", 16, "sig");
    auto kid = json_string(jwk, "kid", 128);
    if (!kty.is_ok() || !alg.is_ok() || !use.is_ok() || !kid.is_ok() || kid->empty()) {
      return Status::error(ErrorKind::kInvalidArgument, "JWK set: key without kty/kid");
    }
    if (kty.value() != "RSA" || alg.value() != "RS256" || use.value() != "sig") continue;
    auto key = rsa_key_from_jwk(jwk);
    if (!key.is_ok()) return key.status().with_context(str_cat("JWK set: kid ", kid.value()));
    if (impl_->by_kid.count(kid.value())) {
      return Status::error(ErrorKind::kInvalidArgument, str_cat("JWK set: duplicate kid ", kid.value()));
    }
    impl_->by_kid[kid.value()] = std::move(key).value();
    ++added;
  }
  if (added == 0) return Status::error(ErrorKind::kInvalidArgument, "JWK set: no RS256 signing key");
  return Status::ok();
}

Status GcpTrustStore::add_file(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  sources_.push_back(Source{path});
  Status s = load_locked();
  if (!s.is_ok()) sources_.pop_back();
  return s;
}

bool GcpTrustStore::empty() const { return sources_.empty(); }

Status GcpTrustStore::load_locked() {
  auto next = std::make_shared<JwkSet>();
  std::vector<Source> seen = sources_;
  for (Source& src : seen) {
    struct stat st{};
    if (stat(src.path.c_str(), &st) != 0) {
      return Status::error(ErrorKind::kIo, str_cat("GCP JWK set ", src.path, ": cannot stat"));
    }
    auto text = read_small_file(src.path, kMaxJwksSize);
    if (!text.is_ok()) return text.status().with_context(str_cat("GCP JWK set ", src.path));
    Status s = next->add_json(text.value());
    if (!s.is_ok()) return s.with_context(src.path);
    src.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
    src.size = st.st_size;
    src.inode = st.st_ino;
  }
  sources_ = std::move(seen);
  keys_ = std::move(next);
  return Status::ok();
}

std::shared_ptr<const JwkSet> GcpTrustStore::keys() {
  std::lock_guard<std::mutex> lock(mu_);
  bool changed = false;
  for (const Source& src : sources_) {
    struct stat st{};
    if (stat(src.path.c_str(), &st) != 0 ||
        static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec != src.mtime_ns ||
        st.st_size != src.size || st.st_ino != src.inode) {
      changed = true;
    }
  }
  if (changed) {
    Status s = load_locked();
    if (s.is_ok()) {
      log_info(str_cat("GCP JWK set reloaded: ", keys_->size(), " keys"));
    } else {
      log_warning(str_cat("GCP JWK set not reloaded, keeping the previous keys: ", s.message()));
      // Do not retry on every request; the next change on disk tries again.
      for (Source& src : sources_) {
        struct stat st{};
        if (stat(src.path.c_str(), &st) == 0) {
          src.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
          src.size = st.st_size;
          src.inode = st.st_ino;
        }
      }
    }
  }
  return keys_;
}

Result<Identity> verify_gcp_identity_token(std::string_view token, const JwkSet& keys,
                                           const Clock& clock, const GcpTokenCheck& check) {
  if (token.empty() || token.size() > kMaxTokenSize) {
    return Status::error(ErrorKind::kInvalidArgument, "GCP token: empty or too large");
  }
  std::string_view parts[3];
  if (!split_jws(token, parts)) {
    return Status::error(ErrorKind::kInvalidArgument, "GCP token: not a signed JWT (header.payload.signature)");
  }
  auto header = decode_json_part(parts[0], "header");
  if (!header.is_ok()) return header.status();
  auto alg = json_string(header.value(), "alg", 16);
  auto kid = json_string(header.value(), "kid", 128);
  auto typ = json_optional_string(header.value(), "typ", 16, "JWT");
  if (!alg.is_ok() || !kid.is_ok() || !typ.is_ok()) {
    return Status::error(ErrorKind::kInvalidArgument, "GCP token: header needs alg and kid");
  }
  if (alg.value() != "RS256" || typ.value() != "JWT" || header->isMember("crit")) {
    return Status::error(ErrorKind::kIntegrity,
                         str_cat("GCP token: unsupported header (alg ", alg.value(), ")"));
  }
  auto it = keys.impl().by_kid.find(kid.value());
  if (it == keys.impl().by_kid.end()) {
    return Status::error(ErrorKind::kIntegrity,
                         str_cat("GCP token: signing key ", kid.value(), " is not in the trust store"));
  }
  auto signature = base64url_decode(parts[2]);
  if (!signature.is_ok() ||
      signature->size() != static_cast<size_t>(EVP_PKEY_get_size(it->second.get()))) {
    return Status::error(ErrorKind::kIntegrity, "GCP token: malformed signature");
  }
  const std::string_view signed_part = token.substr(0, parts[0].size() + 1 + parts[1].size());
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> md(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_PKEY_CTX* pctx = nullptr;
  if (!md || EVP_DigestVerifyInit(md.get(), &pctx, EVP_sha256(), nullptr, it->second.get()) != 1 ||
      EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PADDING) != 1) {
    return Status::error(ErrorKind::kInternal, "GCP token: verifier setup failed");
  }
  if (EVP_DigestVerify(md.get(), signature->data(), signature->size(),
                       reinterpret_cast<const unsigned char*>(signed_part.data()),
                       signed_part.size()) != 1) {
    openssl_last_error();
    return Status::error(ErrorKind::kIntegrity, "GCP token: signature does not verify");
  }

  // Signed by Google: now the claims.
  auto payload = decode_json_part(parts[1], "payload");
  if (!payload.is_ok()) return payload.status();
  const Json::Value& p = payload.value();
  auto iss = json_string(p, "iss", 64);
  if (!iss.is_ok() || (iss.value() != "https://accounts.google.com" && iss.value() != "accounts.google.com")) {
    return Status::error(ErrorKind::kIntegrity, "GCP token: issuer is not Google");
  }
  auto aud = json_string(p, "aud", 512);
  if (!aud.is_ok() || aud.value() != check.audience) {
    return Status::error(ErrorKind::kRefused,
                         "GCP token: audience does not carry this challenge's binding (a replay?)");
  }
  auto iat = json_int(p, "iat", 0, INT64_MAX / 2);
  auto exp = json_int(p, "exp", 0, INT64_MAX / 2);
  if (!iat.is_ok() || !exp.is_ok() || exp.value() < iat.value()) {
    return Status::error(ErrorKind::kInvalidArgument, "GCP token: malformed iat/exp");
  }
  const int64_t now = clock.now_unix();
  if (iat.value() > now + check.skew_seconds) {
    return Status::error(ErrorKind::kRefused, "GCP token: issued in the future (clock skew?)");
  }
  if (now > exp.value() + check.skew_seconds) {
    return Status::error(ErrorKind::kRefused, "GCP token: expired");
  }
  if (now - iat.value() > check.max_age_seconds + check.skew_seconds) {
    return Status::error(ErrorKind::kRefused,
                         str_cat("GCP token: issued ", now - iat.value(), " s ago (limit ",
                                 check.max_age_seconds, " s)"));
  }
  const Json::Value& google = p["google"];
  const Json::Value ce = google.isObject() ? google["compute_engine"] : Json::Value();
  if (!ce.isObject()) {
    return Status::error(ErrorKind::kInvalidArgument,
                         "GCP token: no google.compute_engine claims (request format=full)");
  }
  Identity id;
  id.platform = "gcp";
  for (const char* name : {"project_id", "zone", "instance_id", "instance_name"}) {
    auto v = json_string(ce, name, 128);
    if (!v.is_ok() || v->empty()) return v.status().with_context("GCP token compute_engine");
    id.claims[name] = v.value();
  }
  auto number = json_int(ce, "project_number", 1, INT64_MAX);
  if (!number.is_ok()) return number.status().with_context("GCP token compute_engine");
  id.claims["project_number"] = std::to_string(number.value());
  if (ce.isMember("license_id")) {
    const Json::Value& licenses = ce["license_id"];
    if (!licenses.isArray() || licenses.size() > 16) {
      return Status::error(ErrorKind::kInvalidArgument, "GCP token: malformed license_id");
    }
    std::string joined;
    for (const auto& l : licenses) {
      if (!l.isString() || l.asString().size() > 32) {
        return Status::error(ErrorKind::kInvalidArgument, "GCP token: malformed license_id");
      }
      joined += (joined.empty() ? "" : ",") + l.asString();
    }
    id.claims["license_id"] = joined;
  }
  // The instance's service account, as Google states it (verified). One
  // that is absent, unverified or too long sets no claim: a policy that
  // requires one then refuses.
  if (p["email"].isString() && p["email_verified"].isBool() && p["email_verified"].asBool()) {
    const std::string email = p["email"].asString();
    if (!email.empty() && email.size() <= 128 && printable(email, 128) == email)
      id.claims["service_account"] = email;
  }
  return id;
}

}  // namespace keygate::server
