// Verification of GCE instance identity tokens (format=full): RS256 JWTs
// signed by Google, whose public keys are published as a JWK set
// (https://www.googleapis.com/oauth2/v3/certs). The audience carries the
// unlock's binding value, so a token is good for one challenge only.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "core/clock.h"
#include "core/status.h"
#include "server/policy.h"

namespace keygate::server {

// Google's signing keys: RSA keys by key id.
class JwkSet {
 public:
  JwkSet();
  ~JwkSet();
  JwkSet(JwkSet&&) noexcept;
  JwkSet& operator=(JwkSet&&) noexcept;

  // Adds every RSA signing key of a JWK set document ({"keys": [...]}).
  // Keys for other uses or algorithms are skipped; a malformed RSA key, a
  // key under 2048 bits, a duplicate key id or a set with no usable key
  // fails.
  Status add_json(std::string_view jwks);
  size_t size() const;

  struct Impl;
  const Impl& impl() const { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

// JWK set files that are re-read when they change on disk (a timer or a
// config-management tool refreshes them from Google's endpoint). A file
// that becomes unreadable or invalid keeps the previous keys and is
// reported; a server never silently ends up with no keys.
class GcpTrustStore {
 public:
  Status add_file(const std::string& path);
  bool empty() const;
  // The current keys, reloading changed files first.
  std::shared_ptr<const JwkSet> keys();

 private:
  struct Source {
    std::string path;
    int64_t mtime_ns = 0;
    int64_t size = 0;
    uint64_t inode = 0;
  };
  Status load_locked();
  std::mutex mu_;
  std::vector<Source> sources_;
  std::shared_ptr<const JwkSet> keys_;
};

struct GcpTokenCheck {
  std::string audience;          // must equal the token's aud exactly
  int64_t max_age_seconds = 300;  // iat no older than this
  int64_t skew_seconds = 60;      // allowed clock difference
};

// Verifies signature, header (alg RS256, known kid), iss, aud, iat/exp
// against `clock`, and the google.compute_engine claims; returns them as an
// Identity (platform "gcp"). Malformed input is kInvalidArgument, anything
// that does not verify kIntegrity, a stale or early token kRefused.
Result<Identity> verify_gcp_identity_token(std::string_view token, const JwkSet& keys,
                                           const Clock& clock, const GcpTokenCheck& check);

}  // namespace keygate::server
