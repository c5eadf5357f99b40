// Instance evidence, every platform: picks the verifier named by the
// request's evidence object ({"aws": ...}, {"gcp": ...} or {"azure": ...}),
// checks it against the trust store and the challenge's binding value, and
// returns the verified Identity the policy is evaluated on.
#pragma once

#include <json/value.h>

#include "core/clock.h"
#include "core/encoding.h"
#include "server/aws_identity.h"
#include "server/azure_identity.h"
#include "server/gcp_identity.h"
#include "server/policy.h"

namespace keygate::server {

struct EvidenceTrust {
  AwsTrustStore aws;
  GcpTrustStore gcp;
  AzureTrustStore azure;
  int64_t max_age_seconds = 300;  // GCP tokens and Azure documents
};

class EvidenceVerifier {
 public:
  EvidenceVerifier(EvidenceTrust& trust, const Clock& clock) : trust_(trust), clock_(clock) {}

  // `binding` is binding_value(nonce, client key, volume id) of the request.
  // Errors: kInvalidArgument (malformed), kIntegrity (does not verify),
  // kRefused (stale, or bound to another challenge).
  Result<Identity> verify_identity(const Json::Value& evidence, const Bytes& binding) const;

 private:
  EvidenceTrust& trust_;
  const Clock& clock_;
};

}  // namespace keygate::server
