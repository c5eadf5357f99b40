#include "server/approvals.h"

#include <algorithm>
#include <climits>

#include "core/crypto.h"
#include "core/encoding.h"
#include "core/json.h"
#include "server/policy.h"

namespace keygate::server {
namespace {

constexpr char kIdPrefix[] = "req-";
constexpr size_t kIdChars = 12;  // 60 bits
constexpr char kAlphabet[] = "abcdefghijklmnopqrstuvwxyz234567";
constexpr size_t kMaxClaims = 32;

Json::Value decision_json(const ApprovalDecision& d) {
  Json::Value v(Json::objectValue);
  v["name"] = d.name;
  v["reason"] = d.reason;
  v["time"] = static_cast<Json::Int64>(d.time);
  return v;
}

Result<ApprovalDecision> decision_from_json(const Json::Value& v) {
  auto name = json_string(v, "name", kMaxAdminNameLength);
  auto reason = json_optional_string(v, "reason", kMaxDecisionReason * 4);
  auto time = json_int(v, "time", 0, INT64_MAX);
  for (const Status* s : {&name.status(), &reason.status(), &time.status()}) {
    if (!s->is_ok()) return s->with_context("approval decision");
  }
  return ApprovalDecision{name.value(), reason.value(), time.value()};
}

Json::Value pcr_changes_json(const std::string& bank, const std::map<uint32_t, PcrChange>& changes) {
  Json::Value v(Json::objectValue);
  v["bank"] = bank;
  Json::Value& pcrs = v["pcrs"] = Json::Value(Json::objectValue);
  for (const auto& [pcr, change] : changes) {
    Json::Value& one = pcrs[std::to_string(pcr)] = Json::Value(Json::objectValue);
    Json::Value& accepted = one["accepted"] = Json::Value(Json::arrayValue);
    for (const Bytes& b : change.accepted) accepted.append(hex_encode(b));
    one["quoted"] = hex_encode(change.quoted);
  }
  return v;
}

Status pcr_changes_from_json(const Json::Value& v, std::string* bank, std::map<uint32_t, PcrChange>* out) {
  auto bad = Status::error(ErrorKind::kInvalidArgument, "pcr_changes");
  auto b = json_string(v, "bank", 16);
  if (!b.is_ok() || !v["pcrs"].isObject() || v["pcrs"].size() > 24) return bad;
  *bank = b.value();
  for (const auto& key : v["pcrs"].getMemberNames()) {
    if (key.empty() || key.size() > 2 || key.find_first_not_of("0123456789") != std::string::npos) return bad;
    const Json::Value& one = v["pcrs"][key];
    PcrChange change;
    if (!one["accepted"].isArray() || one["accepted"].size() > 64 || !one["quoted"].isString()) return bad;
    for (const auto& h : one["accepted"]) {
      auto value = h.isString() ? hex_decode(h.asString()) : Result<Bytes>(bad);
      if (!value.is_ok()) return bad;
      change.accepted.push_back(std::move(value).value());
    }
    auto quoted = hex_decode(one["quoted"].asString());
    if (!quoted.is_ok()) return bad;
    change.quoted = std::move(quoted).value();
    (*out)[static_cast<uint32_t>(std::stoul(key))] = std::move(change);
  }
  return Status::ok();
}

}  // namespace

const char* admin_role_name(AdminRole role) {
  switch (role) {
    case AdminRole::kViewer: return "viewer";
    case AdminRole::kApprover: return "approver";
    case AdminRole::kAdmin: return "admin";
  }
  return "viewer";
}

std::optional<AdminRole> parse_admin_role(std::string_view name) {
  for (AdminRole r : {AdminRole::kViewer, AdminRole::kApprover, AdminRole::kAdmin}) {
    if (name == admin_role_name(r)) return r;
  }
  return std::nullopt;
}

bool is_admin_name(std::string_view name) {
  if (name.empty() || name.size() > kMaxAdminNameLength) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '@' || c == '-';
  });
}

std::string new_approval_id() {
  const Bytes raw = random_bytes(kIdChars);
  std::string id = kIdPrefix;
  for (uint8_t b : raw) id += kAlphabet[b % 32];
  return id;
}

bool is_approval_id(std::string_view id) {
  const std::string_view prefix(kIdPrefix);
  if (id.size() != prefix.size() + kIdChars || id.substr(0, prefix.size()) != prefix) return false;
  return std::all_of(id.begin() + static_cast<long>(prefix.size()), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '2' && c <= '7');
  });
}

std::string Approval::state_at(int64_t now) const {
  return state == "pending" && now > expires_at ? "expired" : state;
}

Json::Value Approval::to_instance_json(int64_t now) const {
  Json::Value v(Json::objectValue);
  v["request_id"] = id;
  v["volume_id"] = volume_id;
  v["instance"] = instance;
  v["state"] = state_at(now);
  v["policy"] = policy;
  v["expires_in"] = static_cast<Json::Int64>(std::max<int64_t>(0, expires_at - now));
  v["approvals_needed"] = needed;
  v["approvals"] = static_cast<int>(approvals.size());
  Json::Value& c = v["claims"] = Json::Value(Json::objectValue);
  for (const auto& [k, value] : claims) c[k] = value;
  v["platform"] = platform;
  if (!pcr_changes.empty()) v["pcr_changes"] = pcr_changes_json(pcr_bank, pcr_changes);
  return v;
}

Json::Value Approval::to_json(int64_t now) const {
  Json::Value v = to_instance_json(now);
  v["mode"] = mode;
  v["issued_by"] = issued_by;
  v["policy_by"] = policy_by;
  v["created_at"] = static_cast<Json::Int64>(created_at);
  v["expires_at"] = static_cast<Json::Int64>(expires_at);
  Json::Value& list = v["approved_by"] = Json::Value(Json::arrayValue);
  for (const auto& d : approvals) list.append(decision_json(d));
  if (denial) v["denied_by"] = decision_json(*denial);
  return v;
}

ApprovalRecord Approval::to_record() const {
  Json::Value v(Json::objectValue);
  v["policy"] = policy;
  v["mode"] = mode;
  v["platform"] = platform;
  Json::Value& c = v["claims"] = Json::Value(Json::objectValue);
  for (const auto& [k, value] : claims) c[k] = value;
  v["issued_by"] = issued_by;
  v["policy_by"] = policy_by;
  v["needed"] = needed;
  Json::Value& list = v["approvals"] = Json::Value(Json::arrayValue);
  for (const auto& d : approvals) list.append(decision_json(d));
  if (denial) v["denial"] = decision_json(*denial);
  if (!pcr_changes.empty()) v["pcr_changes"] = pcr_changes_json(pcr_bank, pcr_changes);
  return ApprovalRecord{id, volume_id, instance, state, keygate::to_json(v), created_at, expires_at};
}

Result<Approval> Approval::from_record(const ApprovalRecord& r) {
  auto bad = [&r](const std::string& what) {
    return Status::error(ErrorKind::kIntegrity, str_cat("approval request ", r.id, ": ", what));
  };
  auto v = parse_json_object(r.record);
  if (!v.is_ok()) return bad(v.status().message());
  Approval a;
  a.id = r.id;
  a.volume_id = r.volume_id;
  a.instance = r.instance;
  a.state = r.state;
  a.created_at = r.created_at;
  a.expires_at = r.expires_at;
  auto policy = json_optional_string(v.value(), "policy", kMaxPolicyNameLength);
  auto mode = json_optional_string(v.value(), "mode", 16);
  auto platform = json_optional_string(v.value(), "platform", 16);
  auto issuer = json_optional_string(v.value(), "issued_by", kMaxAdminNameLength);
  auto policy_by = json_optional_string(v.value(), "policy_by", kMaxAdminNameLength);
  auto needed = json_int(v.value(), "needed", 1, 16);
  for (const Status* s : {&policy.status(), &mode.status(), &platform.status(), &issuer.status(),
                          &policy_by.status(), &needed.status()}) {
    if (!s->is_ok()) return bad(s->message());
  }
  a.policy = policy.value();
  a.mode = mode.value();
  a.platform = platform.value();
  a.issued_by = issuer.value();
  a.policy_by = policy_by.value();
  a.needed = static_cast<int>(needed.value());
  const Json::Value& claims = v.value()["claims"];
  if (!claims.isObject() || claims.size() > kMaxClaims) return bad("claims");
  for (const auto& k : claims.getMemberNames()) {
    if (!claims[k].isString()) return bad("claims");
    a.claims[k] = claims[k].asString();
  }
  const Json::Value& list = v.value()["approvals"];
  if (!list.isArray() || list.size() > 16) return bad("approvals");
  for (const auto& d : list) {
    auto decision = decision_from_json(d);
    if (!decision.is_ok()) return bad(decision.status().message());
    a.approvals.push_back(std::move(decision).value());
  }
  if (v.value().isMember("pcr_changes") &&
      !pcr_changes_from_json(v.value()["pcr_changes"], &a.pcr_bank, &a.pcr_changes).is_ok()) {
    return bad("pcr_changes");
  }
  if (v.value().isMember("denial")) {
    auto decision = decision_from_json(v.value()["denial"]);
    if (!decision.is_ok()) return bad(decision.status().message());
    a.denial = std::move(decision).value();
  }
  return a;
}

Status may_approve(const Approval& request, const AdminIdentity& who) {
  if (who.role == AdminRole::kViewer) {
    return Status::error(ErrorKind::kRefused, str_cat(who.name, " is a viewer: approving needs the approver or admin role"));
  }
  if (who.name == request.instance) {
    return Status::error(ErrorKind::kRefused, str_cat(who.name, " is the instance that asked: it cannot approve its own request"));
  }
  if (!request.issued_by.empty() && who.name == request.issued_by) {
    return Status::error(ErrorKind::kRefused,
                         str_cat(who.name, " issued the enrollment token of volume ", request.volume_id,
                                 ": someone else must approve its releases"));
  }
  if (!request.policy_by.empty() && who.name == request.policy_by) {
    return Status::error(ErrorKind::kRefused,
                         str_cat(who.name, " put the policy file in effect that asked for this approval: "
                                           "someone else must approve it"));
  }
  for (const auto& d : request.approvals) {
    if (d.name == who.name) {
      return Status::error(ErrorKind::kRefused,
                           str_cat(who.name, " has approved this request already: the next approval must come from someone else"));
    }
  }
  return Status::ok();
}

}  // namespace keygate::server
