// Volume release policy. A volume's policy names the identity it is bound to;
// evaluation denies by default: every bound field must match exactly.
#pragma once

#include <json/value.h>

#include <string>

#include "core/status.h"
#include "server/aws_identity.h"

namespace keygate::server {

struct VolumePolicy {
  std::string platform = "aws";
  std::string account;      // required
  std::string region;       // required
  std::string image_id;     // empty: any image
  std::string instance_id;  // empty: image-group volume (any instance of the image)

  Json::Value to_json() const;
  static Result<VolumePolicy> from_json(const Json::Value& v);
  // A policy that binds nothing a stranger could not also satisfy is refused:
  // account and region always, and an image for group volumes.
  Status check_complete() const;
};

// The template an enrollment token carries; empty fields are taken from the
// enrolling instance's verified identity.
struct EnrollmentTemplate {
  std::string account;
  std::string region;
  std::string image_id;
  bool image_group = false;  // true: do not bind the enrolling instance

  Json::Value to_json() const;
  static Result<EnrollmentTemplate> from_json(const Json::Value& v);
};

// Builds the policy for a new volume from a token's template and, when the
// enrolling instance presented evidence, its identity. A template field that
// contradicts the identity is refused (a token for account A used in B).
Result<VolumePolicy> policy_for_enrollment(const EnrollmentTemplate& tmpl,
                                           const AwsIdentity* identity);

// OK if `identity` satisfies `policy`; otherwise kRefused naming the field
// (the message is for the server's log, not for the client).
Status evaluate_policy(const VolumePolicy& policy, const AwsIdentity& identity);

}  // namespace keygate::server
