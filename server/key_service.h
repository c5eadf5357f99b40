// The key server's API logic, independent of HTTP: each call takes the
// request body and the peer's address and returns a status code and a JSON
// body. Every release and refusal is audited (store) and logged, without
// secrets. Refusal reasons go to the log; clients get a short code.
#pragma once

#include <json/value.h>

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/clock.h"
#include "core/secret.h"
#include "server/evidence.h"
#include "server/policy.h"
#include "server/store.h"

namespace keygate::server {

struct ServiceOptions {
  int nonce_ttl_seconds = 60;
  // Enrollment without a token: an instance whose verified identity has every
  // claim of a rule may register a per-instance volume under that rule.
  std::vector<EnrollmentTemplate> attestation_enrollment;
};

struct ApiResponse {
  int status = 200;
  Json::Value body;
};

// {"error": {"code": code, "message": message}}
ApiResponse error_response(int status, const char* code, std::string message);

class KeyService {
 public:
  KeyService(Store& store, SecretBuffer kek, EvidenceTrust& trust, const Clock& clock,
             ServiceOptions options);

  ApiResponse challenge(const std::string& peer);
  ApiResponse unlock(std::string_view body, const std::string& peer);
  ApiResponse enroll_register(std::string_view body, const std::string& peer);
  ApiResponse enroll_confirm(std::string_view body, const std::string& peer);

 private:
  struct Common;  // fields every attested request carries
  Result<Common> parse_common(const Json::Value& request);
  // Parses a request body; a malformed one is audited as refused.
  Result<Json::Value> parse_request(const char* event, std::string_view body,
                                    const std::string& peer);
  Result<Identity> verify_evidence(const Json::Value& evidence, const Common& common,
                                   const std::string& volume_id);
  // The TPM part of an unlock: the quote, the PCR values, and an armed
  // accept-next (applied here). False with `refusal` set when refused.
  bool check_tpm(const char* event, const std::string& vid, const std::string& peer,
                 const std::string& stored_policy, const VolumePolicy& policy,
                 const Json::Value& request, const Common& common, ApiResponse* refusal);
  // Appends to the audit log, then logs the line. A failed append is logged
  // and returned, so that a release can be withheld (write_audit); refusals
  // and errors go on either way (audit).
  Status write_audit(const std::string& event, const std::string& outcome,
                     const std::string& volume_id, const std::string& peer,
                     const std::string& detail);
  void audit(const std::string& event, const std::string& outcome, const std::string& volume_id,
             const std::string& peer, const std::string& detail);
  ApiResponse unaudited(const char* event, const std::string& volume_id);

  Store& store_;
  SecretBuffer kek_;
  EvidenceVerifier evidence_;
  const Clock& clock_;
  ServiceOptions options_;
};

// Seals a volume secret under the KEK, bound to the volume id.
Result<Bytes> seal_volume_secret(const SecretBuffer& kek, const SecretBuffer& secret,
                                 const std::string& volume_id);
Result<SecretBuffer> open_volume_secret(const SecretBuffer& kek, const Bytes& sealed,
                                        const std::string& volume_id);

// A random RFC 4122 version-4 UUID.
std::string new_volume_id();

// Creates a one-time (or `uses`-time) enrollment token; returns the token
// value, shown once. Only its SHA-256 is stored.
Result<std::string> create_enrollment_token(Store& store, const EnrollmentTemplate& tmpl,
                                            int64_t now, int64_t ttl_seconds, int uses);

}  // namespace keygate::server
