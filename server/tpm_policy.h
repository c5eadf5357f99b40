// TPM evidence at the key server: a quote bound to the request's binding
// value, verified with the attestation key registered at enrollment, and the
// quoted PCR values checked against the volume's TPM policy.
//
// The request carries, beside the cloud evidence:
//   "tpm": {"attest": b64 TPMS_ATTEST, "signature": b64 TPMT_SIGNATURE,
//           "pcrs": {"<index>": "<hex value>", ...}}
// and at enrollment also "ak_public" (b64 TPMT_PUBLIC), "bank" and "sealed".
#pragma once

#include <json/value.h>

#include <map>
#include <vector>

#include "core/encoding.h"
#include "core/status.h"
#include "server/policy.h"

namespace keygate::server {

struct TpmCheck {
  std::map<uint32_t, Bytes> values;  // the quoted values
  std::vector<uint32_t> mismatched;  // PCRs whose value the policy does not accept
  std::string describe_mismatch() const;
};

// Verifies the quote (kInvalidArgument malformed, kIntegrity not verifying,
// kRefused bound to another challenge) and compares the values with the
// policy (mismatches are reported, not failed: accept-next decides).
Result<TpmCheck> check_tpm_evidence(const TpmPolicy& policy, const Json::Value& evidence,
                                    const Bytes& binding);

// The TPM part of a new volume's policy: the attestation key must be a
// restricted signing key, and its quote over the enrollment's binding
// proves possession and gives the PCR baseline.
Result<TpmPolicy> tpm_policy_for_enrollment(const Json::Value& evidence, const Bytes& binding);

}  // namespace keygate::server
