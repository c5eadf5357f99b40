#include "server/policy.h"

#include "core/json.h"

namespace keygate::server {
namespace {

constexpr size_t kMaxFieldLength = 128;

}  // namespace

Json::Value VolumePolicy::to_json() const {
  Json::Value v(Json::objectValue);
  v["platform"] = platform;
  v["account"] = account;
  v["region"] = region;
  v["image_id"] = image_id;
  v["instance_id"] = instance_id;
  return v;
}

Result<VolumePolicy> VolumePolicy::from_json(const Json::Value& v) {
  VolumePolicy p;
  auto platform = json_string(v, "platform", 16);
  auto account = json_string(v, "account", kMaxFieldLength);
  auto region = json_string(v, "region", kMaxFieldLength);
  auto image = json_optional_string(v, "image_id", kMaxFieldLength);
  auto instance = json_optional_string(v, "instance_id", kMaxFieldLength);
  for (const Status* s : {&platform.status(), &account.status(), &region.status(),
                          &image.status(), &instance.status()}) {
    if (!s->is_ok()) return s->with_context("policy");
  }
  p.platform = platform.value();
  p.account = account.value();
  p.region = region.value();
  p.image_id = image.value();
  p.instance_id = instance.value();
  if (p.platform != "aws") {
    return Status::error(ErrorKind::kInvalidArgument, "policy: unsupported platform");
  }
  return p;
}

Status VolumePolicy::check_complete() const {
  if (account.empty()) return Status::error(ErrorKind::kInvalidArgument, "policy: no account");
  if (region.empty()) return Status::error(ErrorKind::kInvalidArgument, "policy: no region");
  if (instance_id.empty() && image_id.empty()) {
    return Status::error(ErrorKind::kInvalidArgument,
                         "policy: an image-group volume must name its image id");
  }
  return Status::ok();
}

Json::Value EnrollmentTemplate::to_json() const {
  Json::Value v(Json::objectValue);
  v["account"] = account;
  v["region"] = region;
  v["image_id"] = image_id;
  v["image_group"] = image_group;
  return v;
}

Result<EnrollmentTemplate> EnrollmentTemplate::from_json(const Json::Value& v) {
  EnrollmentTemplate t;
  auto account = json_optional_string(v, "account", kMaxFieldLength);
  auto region = json_optional_string(v, "region", kMaxFieldLength);
  auto image = json_optional_string(v, "image_id", kMaxFieldLength);
  for (const Status* s : {&account.status(), &region.status(), &image.status()}) {
    if (!s->is_ok()) return s->with_context("enrollment template");
  }
  t.account = account.value();
  t.region = region.value();
  t.image_id = image.value();
  t.image_group = v.isMember("image_group") && v["image_group"].isBool() &&
                  v["image_group"].asBool();
  return t;
}

Result<VolumePolicy> policy_for_enrollment(const EnrollmentTemplate& tmpl,
                                           const AwsIdentity* identity) {
  VolumePolicy p;
  auto pick = [&](const std::string& from_template, const std::string* from_identity,
                  const char* name, std::string* out) -> Status {
    if (!from_template.empty() && from_identity != nullptr && *from_identity != from_template) {
      return Status::error(ErrorKind::kRefused,
                           str_cat("enrolling instance's ", name, " is not the token's"));
    }
    *out = !from_template.empty() ? from_template
                                  : (from_identity != nullptr ? *from_identity : "");
    return Status::ok();
  };
  KEYGATE_RETURN_IF_ERROR(pick(tmpl.account, identity ? &identity->account_id : nullptr,
                               "account", &p.account));
  KEYGATE_RETURN_IF_ERROR(
      pick(tmpl.region, identity ? &identity->region : nullptr, "region", &p.region));
  if (tmpl.image_group) {
    // The image a group volume is baked into is named by the token; the
    // builder instance's own image is usually a different one.
    p.image_id = !tmpl.image_id.empty() ? tmpl.image_id
                                        : (identity != nullptr ? identity->image_id : "");
  } else {
    KEYGATE_RETURN_IF_ERROR(pick(tmpl.image_id, identity ? &identity->image_id : nullptr,
                                 "image id", &p.image_id));
    if (identity == nullptr) {
      return Status::error(ErrorKind::kInvalidArgument,
                           "a per-instance volume must be enrolled with instance evidence "
                           "(or use an image-group token)");
    }
    p.instance_id = identity->instance_id;
  }
  KEYGATE_RETURN_IF_ERROR(p.check_complete());
  return p;
}

Status evaluate_policy(const VolumePolicy& policy, const AwsIdentity& identity) {
  KEYGATE_RETURN_IF_ERROR(policy.check_complete());
  auto mismatch = [](const char* field, const std::string& want, const std::string& got) {
    return Status::error(ErrorKind::kRefused,
                         str_cat(field, " mismatch (policy ", want, ", instance ", got, ")"));
  };
  if (identity.account_id != policy.account) {
    return mismatch("account", policy.account, identity.account_id);
  }
  if (identity.region != policy.region) return mismatch("region", policy.region, identity.region);
  if (!policy.image_id.empty() && identity.image_id != policy.image_id) {
    return mismatch("image", policy.image_id, identity.image_id);
  }
  if (!policy.instance_id.empty() && identity.instance_id != policy.instance_id) {
    return mismatch("instance", policy.instance_id, identity.instance_id);
  }
  return Status::ok();
}

}  // namespace keygate::server
