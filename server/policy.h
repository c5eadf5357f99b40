// Volume release policy, one model for every platform: a verifier turns
// evidence into an Identity (a platform and its claims), a policy names the
// claims a volume is bound to, and evaluation is deny-by-default: every bound
// claim must be present and equal.
#pragma once

#include <json/value.h>

#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "core/encoding.h"
#include "core/status.h"

namespace keygate::server {

// Verified evidence: what the provider vouched for.
struct Identity {
  std::string platform;  // "aws", "gcp" or "azure"
  std::map<std::string, std::string> claims;

  // The claim's value, or "" when absent.
  std::string claim(const std::string& name) const;
  // "<platform> <instance claim>=<value>" for logs and audit.
  std::string summary() const;
};

// What each platform's verifier yields and what a policy must bind.
struct PlatformSpec {
  std::string name;
  std::vector<std::string> claims;        // every claim the verifier yields
  std::vector<std::string> always_bound;  // every policy binds these
  std::string instance_claim;             // per-instance volumes bind this too
  std::vector<std::string> group_bound;   // image-group volumes bind these too
  std::vector<std::string> inherited;     // taken from the enrolling instance
  // Whether the provider signs each request's binding (GCP's token
  // audience, Azure's nonce): evidence that proves a live instance now. AWS's
  // identity document is static, and copies are public, so it does not.
  bool evidence_is_fresh = false;
};

// nullptr for an unknown platform name.
const PlatformSpec* platform_spec(std::string_view name);
// "aws, gcp, azure"
std::string platform_names();

// What a volume enrolled with a TPM is bound to: the attestation key
// registered at enrollment and, per PCR of one bank, the accepted values
// (the first is the baseline; an admin can allow more). An armed
// "accept next" lets one otherwise valid unlock with other values through and
// makes them the new baseline.
struct TpmPolicy {
  Bytes ak_public;  // TPMT_PUBLIC
  std::string bank = "sha256";
  std::map<uint32_t, std::vector<Bytes>> pcrs;
  int64_t accept_next_until = 0;  // 0: not armed
  bool sealed = false;            // part of the keyslot secret is sealed in the TPM

  std::vector<uint32_t> selection() const;
  Json::Value to_json() const;
  static Result<TpmPolicy> from_json(const Json::Value& v);
};

// The most values one PCR may have accepted (the baseline and those allowed
// since); allowing another past it drops the oldest allowed one.
constexpr size_t kMaxAcceptedPcrValues = 64;

constexpr size_t kMaxPolicyNameLength = 64;

// A person's name in an admin certificate.
constexpr size_t kMaxAdminNameLength = 64;
// Whether a policy file's policy name is well formed: 1 to 64 of
// [A-Za-z0-9._-].
bool is_policy_name(std::string_view name);

// The most instances one image-group volume can have revoked (the policy
// is one bounded JSON document; instances that were terminated need none).
constexpr size_t kMaxRevokedInstances = 1000;

struct VolumePolicy {
  std::string platform;
  std::map<std::string, std::string> require;  // claim -> exact value
  std::optional<TpmPolicy> tpm;               // set: every unlock needs a quote
  // Image groups: instances (values of the platform's instance claim) that
  // are refused though they match; the group's others are not.
  std::set<std::string> revoked_instances;
  // A policy of the policy file (server/policy_file.h) that must admit the
  // instance too, by name; empty: none.
  std::string named_policy;
  // Who issued the enrollment token (an admin certificate's name; empty: a
  // token made on the server's host): they may not approve its releases.
  std::string issued_by;
  // manual-first: the instances whose first release was approved; their
  // later releases need no approval. At most kMaxRevokedInstances.
  std::set<std::string> known_instances;
  // The volume this one replaces (keygate rotate, with an ordinary or an
  // administrator's rotation token): confirming this one revokes that one.
  std::string rotates;

  // Whether the volume is an image group's (it binds no one instance).
  bool is_image_group() const;
  // The value of the platform's instance claim in `identity` ("" if none).
  std::string instance_of(const Identity& identity) const;
  // Whether `identity` is one of revoked_instances, or of known_instances.
  bool revokes(const Identity& identity) const;
  bool knows(const Identity& identity) const;
  // Whether both bind the same one instance on the same platform (a
  // rotation replaces only a volume of its own instance).
  bool binds_same_instance_as(const VolumePolicy& other) const;

  Json::Value to_json() const;
  static Result<VolumePolicy> from_json(const Json::Value& v);
  // A policy that binds nothing a stranger could not also satisfy is
  // refused: the platform's always-bound claims, and the instance claim or
  // the group claims.
  Status check_complete() const;
};

// The template an enrollment token carries; claims it does not name are
// taken from the enrolling instance's verified identity.
struct EnrollmentTemplate {
  std::string platform = "aws";
  std::map<std::string, std::string> require;
  bool image_group = false;  // true: do not bind the enrolling instance
  std::string named_policy;  // a policy of the policy file the volume refers to
  std::string issued_by;     // the admin who issued the token, if through the admin API
  std::string rotates;       // a rotation token's: the volume the new one replaces

  Json::Value to_json() const;
  static Result<EnrollmentTemplate> from_json(const Json::Value& v);
  // Unknown platform or claim names, or empty values, are refused.
  Status validate() const;
};

// Builds the policy for a new volume from a token's template and, when the
// enrolling instance presented evidence, its identity. A template claim that
// contradicts the identity is refused (a token for account A used in B), as
// is evidence from another platform than the token's.
Result<VolumePolicy> policy_for_enrollment(const EnrollmentTemplate& tmpl,
                                           const Identity* identity);

// OK if `identity` satisfies `policy`; otherwise kRefused naming the claim
// (the message is for the server's log, not for the client).
Status evaluate_policy(const VolumePolicy& policy, const Identity& identity);

// Enrollment by attestation: the index of the first rule whose platform is
// the identity's and whose every claim the identity has, with that value;
// none if no rule admits it (deny by default).
// Whether `rule` may stand in enroll_by_attestation: a per-instance rule on
// a platform whose evidence is fresh, binding the platform's account claim.
// The message names what is wrong and why.
Status check_attestation_rule(const EnrollmentTemplate& rule);

std::optional<size_t> match_enrollment_rule(const std::vector<EnrollmentTemplate>& rules,
                                            const Identity& identity);

}  // namespace keygate::server
