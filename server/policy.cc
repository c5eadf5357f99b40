#include "server/policy.h"

#include <algorithm>

#include "core/json.h"
#include "core/protocol.h"
#include "tpm/tpm2_format.h"

namespace keygate::server {
namespace {

constexpr size_t kMaxClaimLength = 128;
constexpr size_t kMaxBoundClaims = 16;

const std::vector<PlatformSpec>& specs() {
  static const std::vector<PlatformSpec> kSpecs = {
      {"aws",
       {"account_id", "region", "availability_zone", "image_id", "instance_id", "instance_type",
        "architecture"},
       {"account_id", "region"},
       "instance_id",
       {"image_id"},
       {"account_id", "region", "image_id"},
       false},
      // GCP identity tokens do not name the image: a group volume is bound to
      // the project (and whatever else the token names).
      {"gcp",
       {"project_id", "project_number", "zone", "instance_id", "instance_name", "license_id",
        "service_account"},
       {"project_id"},
       "instance_id",
       {},
       {"project_id"},
       true},
      {"azure",
       {"subscription_id", "vm_id", "sku", "plan_name", "plan_product", "plan_publisher",
        "license_type"},
       {"subscription_id"},
       "vm_id",
       {},
       {"subscription_id"},
       true},
  };
  return kSpecs;
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

Result<std::map<std::string, std::string>> claims_from_json(const Json::Value& v,
                                                            const char* what) {
  std::map<std::string, std::string> out;
  if (v.isNull()) return out;
  if (!v.isObject() || v.size() > kMaxBoundClaims) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat(what, ": 'require' must be an object"));
  }
  for (const auto& name : v.getMemberNames()) {
    if (!v[name].isString() || v[name].asString().size() > kMaxClaimLength) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat(what, ": claim '", name, "' must be a short string"));
    }
    out[name] = v[name].asString();
  }
  return out;
}

Json::Value claims_to_json(const std::map<std::string, std::string>& claims) {
  Json::Value v(Json::objectValue);
  for (const auto& [name, value] : claims) v[name] = value;
  return v;
}

}  // namespace

std::string Identity::claim(const std::string& name) const {
  auto it = claims.find(name);
  return it == claims.end() ? std::string() : it->second;
}

std::string Identity::summary() const {
  const PlatformSpec* spec = platform_spec(platform);
  if (spec == nullptr) return platform;
  return str_cat(platform, " ", spec->instance_claim, "=", claim(spec->instance_claim), " ",
                 spec->always_bound[0], "=", claim(spec->always_bound[0]));
}

const PlatformSpec* platform_spec(std::string_view name) {
  for (const auto& s : specs()) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

std::string platform_names() {
  std::string out;
  for (const auto& s : specs()) out += (out.empty() ? "" : ", ") + s.name;
  return out;
}

std::vector<uint32_t> TpmPolicy::selection() const {
  std::vector<uint32_t> out;
  for (const auto& [pcr, values] : pcrs) out.push_back(pcr);
  return out;
}

Json::Value TpmPolicy::to_json() const {
  Json::Value v(Json::objectValue);
  v["ak"] = base64_encode(ak_public);
  v["bank"] = bank;
  Json::Value p(Json::objectValue);
  for (const auto& [pcr, values] : pcrs) {
    Json::Value list(Json::arrayValue);
    for (const auto& value : values) list.append(hex_encode(value));
    p[std::to_string(pcr)] = list;
  }
  v["pcrs"] = p;
  v["accept_next_until"] = static_cast<Json::Int64>(accept_next_until);
  v["sealed"] = sealed;
  return v;
}

Result<TpmPolicy> TpmPolicy::from_json(const Json::Value& v) {
  auto bad = [](const std::string& what) {
    return Status::error(ErrorKind::kInvalidArgument, "policy.tpm: " + what);
  };
  if (!v.isObject()) return bad("not an object");
  TpmPolicy t;
  auto ak = json_string(v, "ak", 2048);
  auto bank = json_string(v, "bank", 16);
  if (!ak.is_ok() || !bank.is_ok()) return bad("needs ak and bank");
  auto ak_bytes = base64_decode(ak.value());
  if (!ak_bytes.is_ok() || ak_bytes->empty()) return bad("ak is not base64");
  t.ak_public = std::move(ak_bytes).value();
  t.bank = bank.value();
  const Json::Value& p = v["pcrs"];
  if (!p.isObject() || p.empty() || p.size() > 24) return bad("pcrs must name 1 to 24 PCRs");
  for (const auto& key : p.getMemberNames()) {
    if (key.empty() || key.size() > 2 || key.find_first_not_of("0123456789") != std::string::npos ||
        std::stoul(key) > tpm::kMaxPcrIndex || !p[key].isArray() || p[key].empty() || p[key].size() > kMaxAcceptedPcrValues) {
      return bad("bad PCR entry '" + key.substr(0, 8) + "'");
    }
    std::vector<Bytes> values;
    for (const auto& h : p[key]) {
      auto b = h.isString() ? hex_decode(h.asString()) : Result<Bytes>(Status::error(ErrorKind::kInvalidArgument, ""));
      if (!b.is_ok() || b->empty() || b->size() > 64) return bad("bad value for PCR " + key);
      values.push_back(std::move(b).value());
    }
    t.pcrs[static_cast<uint32_t>(std::stoul(key))] = std::move(values);
  }
  t.accept_next_until = v["accept_next_until"].isInt64() ? v["accept_next_until"].asInt64() : 0;
  t.sealed = v["sealed"].isBool() && v["sealed"].asBool();
  return t;
}

Json::Value VolumePolicy::to_json() const {
  Json::Value v(Json::objectValue);
  v["platform"] = platform;
  v["require"] = claims_to_json(require);
  if (tpm) v["tpm"] = tpm->to_json();
  if (!named_policy.empty()) v["named_policy"] = named_policy;
  if (!issued_by.empty()) v["issued_by"] = issued_by;
  if (!rotates.empty()) v["rotates"] = rotates;
  for (const auto& [key, set] : {std::pair{"revoked_instances", &revoked_instances},
                                 std::pair{"known_instances", &known_instances}}) {
    if (set->empty()) continue;
    Json::Value& list = v[key] = Json::Value(Json::arrayValue);
    for (const auto& i : *set) list.append(i);
  }
  return v;
}

bool is_policy_name(std::string_view name) {
  if (name.empty() || name.size() > kMaxPolicyNameLength) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
           c == '-';
  });
}

bool VolumePolicy::binds_same_instance_as(const VolumePolicy& other) const {
  const PlatformSpec* spec = platform_spec(platform);
  if (spec == nullptr || other.platform != platform) return false;
  const auto mine = require.find(spec->instance_claim);
  const auto theirs = other.require.find(spec->instance_claim);
  return mine != require.end() && theirs != other.require.end() && mine->second == theirs->second;
}

bool VolumePolicy::is_image_group() const {
  const PlatformSpec* spec = platform_spec(platform);
  return spec != nullptr && require.count(spec->instance_claim) == 0;
}

std::string VolumePolicy::instance_of(const Identity& identity) const {
  const PlatformSpec* spec = platform_spec(platform);
  return spec == nullptr ? std::string() : identity.claim(spec->instance_claim);
}

bool VolumePolicy::revokes(const Identity& identity) const {
  const std::string instance = instance_of(identity);
  return !instance.empty() && revoked_instances.count(instance) != 0;
}

bool VolumePolicy::knows(const Identity& identity) const {
  const std::string instance = instance_of(identity);
  return !instance.empty() && known_instances.count(instance) != 0;
}

Result<VolumePolicy> VolumePolicy::from_json(const Json::Value& v) {
  VolumePolicy p;
  auto platform = json_string(v, "platform", 16);
  if (!platform.is_ok()) return platform.status().with_context("policy");
  p.platform = platform.value();
  auto require = claims_from_json(v["require"], "policy");
  if (!require.is_ok()) return require.status();
  p.require = std::move(require).value();
  if (v.isMember("tpm")) {
    auto tpm = TpmPolicy::from_json(v["tpm"]);
    if (!tpm.is_ok()) return tpm.status();
    p.tpm = std::move(tpm).value();
  }
  auto named = json_optional_string(v, "named_policy", kMaxPolicyNameLength);
  if (!named.is_ok()) return named.status().with_context("policy");
  p.named_policy = std::move(named).value();
  auto issuer = json_optional_string(v, "issued_by", kMaxAdminNameLength);
  if (!issuer.is_ok()) return issuer.status().with_context("policy");
  p.issued_by = std::move(issuer).value();
  auto rotates = json_optional_string(v, "rotates", 36);
  if (!rotates.is_ok() || !(rotates->empty() || api::is_valid_volume_id(rotates.value()))) {
    return Status::error(ErrorKind::kInvalidArgument, "policy: 'rotates' must be a volume id");
  }
  p.rotates = std::move(rotates).value();
  for (const auto& [key, set] : {std::pair{"revoked_instances", &p.revoked_instances},
                                 std::pair{"known_instances", &p.known_instances}}) {
    if (!v.isMember(key)) continue;
    const Json::Value& list = v[key];
    if (!list.isArray() || list.size() > kMaxRevokedInstances) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("policy: '", key, "' must be a list of at most ", kMaxRevokedInstances));
    }
    for (const auto& i : list) {
      if (!i.isString() || i.asString().empty() || i.asString().size() > kMaxClaimLength) {
        return Status::error(ErrorKind::kInvalidArgument, str_cat("policy: an entry of '", key, "' must be a short string"));
      }
      set->insert(i.asString());
    }
  }
  if (platform_spec(p.platform) == nullptr) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("policy: unsupported platform '", p.platform, "'"));
  }
  return p;
}

Status VolumePolicy::check_complete() const {
  const PlatformSpec* spec = platform_spec(platform);
  if (spec == nullptr) {
    return Status::error(ErrorKind::kInvalidArgument, "policy: unsupported platform");
  }
  auto bound = [this](const std::string& c) {
    auto it = require.find(c);
    return it != require.end() && !it->second.empty();
  };
  for (const auto& c : spec->always_bound) {
    if (!bound(c)) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("policy: a ", platform, " volume must bind '", c, "'"));
    }
  }
  if (!bound(spec->instance_claim)) {
    for (const auto& c : spec->group_bound) {
      if (!bound(c)) {
        return Status::error(ErrorKind::kInvalidArgument,
                             str_cat("policy: an image-group ", platform, " volume must bind '",
                                     c, "'"));
      }
    }
  }
  for (const auto& [c, value] : require) {
    if (!contains(spec->claims, c)) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("policy: ", platform, " has no claim '", c, "'"));
    }
  }
  return Status::ok();
}

Json::Value EnrollmentTemplate::to_json() const {
  Json::Value v(Json::objectValue);
  v["platform"] = platform;
  v["require"] = claims_to_json(require);
  v["image_group"] = image_group;
  if (!named_policy.empty()) v["policy"] = named_policy;
  if (!issued_by.empty()) v["issued_by"] = issued_by;
  if (!rotates.empty()) v["rotates"] = rotates;
  return v;
}

Result<EnrollmentTemplate> EnrollmentTemplate::from_json(const Json::Value& v) {
  EnrollmentTemplate t;
  auto platform = json_string(v, "platform", 16);
  if (!platform.is_ok()) return platform.status().with_context("enrollment template");
  t.platform = platform.value();
  auto require = claims_from_json(v["require"], "enrollment template");
  if (!require.is_ok()) return require.status();
  t.require = std::move(require).value();
  t.image_group = v["image_group"].isBool() && v["image_group"].asBool();
  auto named = json_optional_string(v, "policy", kMaxPolicyNameLength);
  if (!named.is_ok()) return named.status().with_context("enrollment template");
  t.named_policy = std::move(named).value();
  auto issuer = json_optional_string(v, "issued_by", kMaxAdminNameLength);
  if (!issuer.is_ok()) return issuer.status().with_context("enrollment template");
  t.issued_by = std::move(issuer).value();
  auto rotates = json_optional_string(v, "rotates", 36);
  if (!rotates.is_ok()) return rotates.status().with_context("enrollment template");
  t.rotates = std::move(rotates).value();
  KEYGATE_RETURN_IF_ERROR(t.validate());
  return t;
}

Status EnrollmentTemplate::validate() const {
  const PlatformSpec* spec = platform_spec(platform);
  if (spec == nullptr) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("unknown platform '", platform, "' (one of ", platform_names(),
                                 ")"));
  }
  if (require.size() > kMaxBoundClaims) {
    return Status::error(ErrorKind::kInvalidArgument, "too many bound claims");
  }
  if (!named_policy.empty() && !is_policy_name(named_policy)) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("policy name '", printable(named_policy, 80), "': use 1 to ", kMaxPolicyNameLength,
                                 " letters, digits, '.', '_' or '-'"));
  }
  for (const auto& [c, value] : require) {
    if (!contains(spec->claims, c)) {
      std::string known;
      for (const auto& k : spec->claims) known += (known.empty() ? "" : ", ") + k;
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat(platform, " has no claim '", c, "' (one of ", known, ")"));
    }
    if (value.empty() || value.size() > kMaxClaimLength) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("claim '", c, "' needs a value of 1 to ", kMaxClaimLength,
                                   " characters"));
    }
  }
  if (!rotates.empty() &&
      (!api::is_valid_volume_id(rotates) || image_group || !require.count(spec->instance_claim))) {
    return Status::error(ErrorKind::kInvalidArgument,
                         "a rotation token names a volume id and binds the volume's one instance");
  }
  if (image_group && require.count(spec->instance_claim)) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("an image-group token cannot bind '", spec->instance_claim, "'"));
  }
  return Status::ok();
}

Result<VolumePolicy> policy_for_enrollment(const EnrollmentTemplate& tmpl,
                                           const Identity* identity) {
  KEYGATE_RETURN_IF_ERROR(tmpl.validate());
  const PlatformSpec& spec = *platform_spec(tmpl.platform);
  if (identity != nullptr && identity->platform != tmpl.platform) {
    return Status::error(ErrorKind::kRefused,
                         str_cat("enrolling instance is on ", identity->platform,
                                 ", the token is for ", tmpl.platform));
  }
  VolumePolicy p;
  p.platform = tmpl.platform;
  p.require = tmpl.require;
  p.named_policy = tmpl.named_policy;
  p.issued_by = tmpl.issued_by;
  p.rotates = tmpl.rotates;
  if (identity != nullptr) {
    // Every claim the token names must hold for the enrolling instance,
    // except a group volume's group claims: the image it is baked into is
    // usually not the builder's own.
    for (const auto& [c, value] : tmpl.require) {
      if (tmpl.image_group && contains(spec.group_bound, c)) continue;
      if (identity->claim(c) != value) {
        return Status::error(ErrorKind::kRefused,
                             str_cat("enrolling instance's ", c, " is not the token's"));
      }
    }
    for (const auto& c : spec.inherited) {
      if (!p.require.count(c) && !identity->claim(c).empty()) p.require[c] = identity->claim(c);
    }
  }
  if (!tmpl.image_group) {
    if (identity == nullptr) {
      return Status::error(ErrorKind::kInvalidArgument,
                           "a per-instance volume must be enrolled with instance evidence "
                           "(or use an image-group token)");
    }
    const std::string instance = identity->claim(spec.instance_claim);
    if (instance.empty()) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("enrolling instance's evidence has no ", spec.instance_claim));
    }
    p.require[spec.instance_claim] = instance;
  }
  KEYGATE_RETURN_IF_ERROR(p.check_complete());
  return p;
}

namespace {

// Deny by default: the platform and every required claim present and equal.
Status claims_match(const std::string& platform, const std::map<std::string, std::string>& require,
                    const Identity& identity) {
  if (identity.platform != platform) {
    return Status::error(ErrorKind::kRefused, str_cat("platform mismatch (policy ", platform,
                                                      ", instance ", identity.platform, ")"));
  }
  for (const auto& [c, want] : require) {
    const std::string got = identity.claim(c);
    if (got != want) {
      return Status::error(ErrorKind::kRefused, str_cat(c, " mismatch (policy ", want,
                                                        ", instance ", got.empty() ? "-" : got, ")"));
    }
  }
  return Status::ok();
}

}  // namespace

Status evaluate_policy(const VolumePolicy& policy, const Identity& identity) {
  KEYGATE_RETURN_IF_ERROR(policy.check_complete());
  return claims_match(policy.platform, policy.require, identity);
}

Status check_attestation_rule(const EnrollmentTemplate& rule) {
  const PlatformSpec* spec = platform_spec(rule.platform);
  if (spec == nullptr) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("unknown platform '", rule.platform, "'"));
  }
  if (rule.image_group) {
    return Status::error(ErrorKind::kInvalidArgument, "rules enroll per-instance volumes only");
  }
  if (!spec->evidence_is_fresh) {
    return Status::error(
        ErrorKind::kInvalidArgument,
        str_cat("'", rule.platform, "' cannot enroll by attestation: its instance identity document "
                "is static and copies of real ones are public, so it proves no live instance; "
                "enroll ", rule.platform, " instances with a token"));
  }
  for (const auto& claim : spec->always_bound) {
    if (!rule.require.count(claim)) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("a rule must require '", claim, "' (otherwise any ", rule.platform,
                                   " instance could enroll)"));
    }
  }
  return Status::ok();
}

std::optional<size_t> match_enrollment_rule(const std::vector<EnrollmentTemplate>& rules,
                                            const Identity& identity) {
  for (size_t i = 0; i < rules.size(); ++i) {
    // A rule that could not be configured admits no one (deny by default).
    if (!check_attestation_rule(rules[i]).is_ok()) continue;
    if (claims_match(rules[i].platform, rules[i].require, identity).is_ok()) return i;
  }
  return std::nullopt;
}

}  // namespace keygate::server
