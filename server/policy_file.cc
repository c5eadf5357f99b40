#include "server/policy_file.h"

#include <set>

#include <algorithm>
#include <cstdio>

#include "core/crypto.h"
#include "core/encoding.h"
#include "core/file.h"
#include "core/json.h"

namespace keygate::server {

namespace {

// Errors that name where in the file they are.
class Located {
 public:
  Located(std::string_view text, const std::string& source) : text_(text), source_(source) {}

  int line_of(const Json::Value& v) const { return line_at(static_cast<size_t>(std::max<ptrdiff_t>(0, v.getOffsetStart()))); }
  int line_at(size_t offset) const {
    offset = std::min(offset, text_.size());
    return 1 + static_cast<int>(std::count(text_.begin(), text_.begin() + static_cast<ptrdiff_t>(offset), '\n'));
  }
  Status error(int line, const std::string& what) const {
    return Status::error(ErrorKind::kInvalidArgument, str_cat(source_, ":", line, ": ", what));
  }
  Status error(const Json::Value& at, const std::string& what) const { return error(line_of(at), what); }

 private:
  std::string_view text_;
  const std::string& source_;
};

// jsoncpp's own errors read "* Line L, Column C\n  message": the first one
// as "SOURCE:L: message (column C)".
Status syntax_error(const std::string& errors, const Located& at) {
  int line = 0, column = 0;
  if (sscanf(errors.c_str(), "* Line %d, Column %d", &line, &column) != 2) {
    return at.error(1, "malformed JSON");
  }
  size_t start = errors.find('\n');
  std::string message = start == std::string::npos ? "" : errors.substr(start + 1);
  message = message.substr(0, message.find('\n'));
  const size_t first = message.find_first_not_of(' ');
  message = first == std::string::npos ? "malformed JSON" : message.substr(first);
  return at.error(line, str_cat(printable(message, 200), " (column ", column, ")"));
}

Result<int> parse_clock(std::string_view hhmm) {
  if (hhmm.size() != 5 || hhmm[2] != ':') return Status::error(ErrorKind::kInvalidArgument, "");
  for (size_t i : {0u, 1u, 3u, 4u}) {
    if (hhmm[i] < '0' || hhmm[i] > '9') return Status::error(ErrorKind::kInvalidArgument, "");
  }
  const int h = (hhmm[0] - '0') * 10 + (hhmm[1] - '0');
  const int m = (hhmm[3] - '0') * 10 + (hhmm[4] - '0');
  if (h > 24 || m > 59 || (h == 24 && m != 0)) return Status::error(ErrorKind::kInvalidArgument, "");
  return h * 60 + m;
}

// Day names, in the order of the weekday of 1970-01-01 + n days (a Thursday).
constexpr const char* kDays[] = {"mon", "tue", "wed", "thu", "fri", "sat", "sun"};

int weekday_utc(int64_t now) {  // 0: Monday
  const int64_t days = (now >= 0 ? now : now - 86399) / 86400;
  return static_cast<int>(((days + 3) % 7 + 7) % 7);
}

std::string clock_text(int minutes) {
  char buf[16];
  snprintf(buf, sizeof(buf), "%02d:%02d", minutes / 60, minutes % 60);
  return buf;
}

Result<NamedPolicy> parse_one(const std::string& name, const Json::Value& v, const Located& at) {
  NamedPolicy p;
  p.name = name;
  p.line = at.line_of(v);
  const std::string where = str_cat("policy '", name, "'");
  if (!is_policy_name(name)) {
    return at.error(v, str_cat("policy name '", printable(name, 80), "': use 1 to ", kMaxPolicyNameLength,
                               " letters, digits, '.', '_' or '-'"));
  }
  if (!v.isObject()) return at.error(v, where + " must be an object");
  for (const std::string& key : v.getMemberNames()) {
    if (key != "platform" && key != "require" && key != "hours_utc" && key != "approval" &&
        key != "approvers" && key != "approval_timeout" && key != "pcr_change" && key != "days_utc" &&
        key != "max_releases") {
      return at.error(v[key], str_cat(where, ": unknown key '", printable(key, 64),
                                      "' (platform, require, hours_utc, days_utc, max_releases, approval, approvers, approval_timeout, pcr_change)"));
    }
  }
  if (!v.isMember("platform") || !v["platform"].isString()) {
    return at.error(v, str_cat(where, ": 'platform' (", platform_names(), ") is required"));
  }
  p.platform = v["platform"].asString();
  const PlatformSpec* spec = platform_spec(p.platform);
  if (spec == nullptr) {
    return at.error(v["platform"], str_cat(where, ": unknown platform '", printable(p.platform, 32), "' (",
                                           platform_names(), ")"));
  }
  const Json::Value& require = v["require"];
  if (!require.isObject()) return at.error(v.isMember("require") ? require : v, where + ": 'require' (an object of claims) is required");
  for (const std::string& claim : require.getMemberNames()) {
    const Json::Value& value = require[claim];
    if (std::find(spec->claims.begin(), spec->claims.end(), claim) == spec->claims.end()) {
      return at.error(value, str_cat(where, ": ", p.platform, " has no claim '", printable(claim, 64), "'"));
    }
    std::vector<std::string> allowed;
    auto take = [&](const Json::Value& one) -> Status {
      if (!one.isString() || one.asString().empty() || one.asString().size() > 128) {
        return at.error(one, str_cat(where, ": claim '", claim, "' takes a string (1 to 128 bytes) or a list of them"));
      }
      allowed.push_back(one.asString());
      return Status::ok();
    };
    if (value.isArray()) {
      if (value.empty() || value.size() > kMaxAllowedValues) {
        return at.error(value, str_cat(where, ": claim '", claim, "' lists 1 to ", kMaxAllowedValues, " values"));
      }
      for (const auto& one : value) KEYGATE_RETURN_IF_ERROR(take(one));
    } else {
      KEYGATE_RETURN_IF_ERROR(take(value));
    }
    p.require[claim] = std::move(allowed);
  }
  // Deny by default: a policy names at least the account (project,
  // subscription) whose instances it admits. The volume's own bindings
  // (server/policy.h) apply as well.
  const std::string& account = spec->always_bound.front();
  if (p.require.count(account) == 0) {
    return at.error(require, str_cat(where, ": a ", p.platform, " policy must require '", account,
                                     "' (otherwise any ", p.platform, " account's instance would match)"));
  }
  if (v.isMember("hours_utc")) {
    const Json::Value& hours = v["hours_utc"];
    const std::string text = hours.isString() ? hours.asString() : "";
    auto start = parse_clock(std::string_view(text).substr(0, 5));
    auto end = text.size() == 11 && text[5] == '-' ? parse_clock(std::string_view(text).substr(6)) : Result<int>(Status::error(ErrorKind::kInvalidArgument, ""));
    if (!start.is_ok() || !end.is_ok() || start.value() == end.value()) {
      return at.error(hours, str_cat(where, ": 'hours_utc' is \"HH:MM-HH:MM\" (UTC; the end may be past midnight, e.g. \"22:00-06:00\")"));
    }
    p.hours_utc = std::make_pair(start.value(), end.value());
  }
  if (v.isMember("days_utc")) {
    const Json::Value& days = v["days_utc"];
    const std::string usage = where + ": 'days_utc' lists days of the week (UTC) as \"mon\" ... \"sun\", each once";
    if (!days.isArray() || days.empty() || days.size() > 7) return at.error(days, usage);
    std::set<int> seen;
    for (const auto& d : days) {
      int found = -1;
      for (int i = 0; i < 7; ++i) {
        if (d.isString() && d.asString() == kDays[i]) found = i;
      }
      if (found < 0 || !seen.insert(found).second) return at.error(d, usage);
    }
    p.days_utc = std::move(seen);
  }
  if (v.isMember("max_releases")) {
    const Json::Value& m = v["max_releases"];
    const std::string usage = str_cat(where, ": 'max_releases' is {\"count\": 1 to ", kMaxReleaseCount,
                                      ", \"period\": ", kMinReleasePeriod, " to ", kMaxReleasePeriod, " seconds}");
    if (!m.isObject() || m.size() != 2 || !m["count"].isInt() || !m["period"].isInt()) return at.error(m, usage);
    const int count = m["count"].asInt(), period = m["period"].asInt();
    if (count < 1 || count > kMaxReleaseCount || period < kMinReleasePeriod || period > kMaxReleasePeriod) {
      return at.error(m, usage);
    }
    p.max_releases = std::make_pair(count, period);
  }
  if (v.isMember("approval")) {
    const Json::Value& approval = v["approval"];
    if (!approval.isString()) return at.error(approval, where + ": 'approval' is a string");
    p.approval = approval.asString();
    if (p.approval != "automatic" && p.approval != "manual" && p.approval != "manual-first") {
      return at.error(approval, str_cat(where, ": unknown approval '", printable(p.approval, 32),
                                        "' (automatic, manual, manual-first)"));
    }
  }
  if (v.isMember("pcr_change")) {
    const Json::Value& change = v["pcr_change"];
    p.pcr_change = change.isString() ? change.asString() : "";
    if (p.pcr_change != "refuse" && p.pcr_change != "approval") {
      return at.error(change, str_cat(where, ": 'pcr_change' is \"refuse\" or \"approval\""));
    }
  }
  const bool asks_people = p.approval != "automatic" || p.pcr_change == "approval";
  for (const char* key : {"approvers", "approval_timeout"}) {
    if (v.isMember(key) && !asks_people) {
      return at.error(v[key], str_cat(where, ": '", key,
                                      "' needs approval 'manual' or 'manual-first', or pcr_change 'approval'"));
    }
  }
  if (v.isMember("approvers")) {
    const Json::Value& n = v["approvers"];
    if (!n.isInt() || n.asInt() < 1 || n.asInt() > kMaxApprovers) {
      return at.error(n, str_cat(where, ": 'approvers' is 1 to ", kMaxApprovers,
                                 " (how many different people must approve)"));
    }
    p.approvers = n.asInt();
  }
  if (v.isMember("approval_timeout")) {
    const Json::Value& t = v["approval_timeout"];
    if (!t.isInt() || t.asInt() < kMinApprovalTimeout || t.asInt() > kMaxApprovalTimeout) {
      return at.error(t, str_cat(where, ": 'approval_timeout' is ", kMinApprovalTimeout, " to ",
                                 kMaxApprovalTimeout, " seconds"));
    }
    p.approval_timeout = t.asInt();
  }
  return p;
}

}  // namespace

Result<PolicySet> parse_policy_file(std::string_view text, const std::string& source) {
  const Located at(text, source);
  if (text.size() > kMaxPolicyFile) return at.error(1, str_cat("larger than ", kMaxPolicyFile, " bytes"));
  if (!is_utf8(text)) return at.error(1, "not UTF-8");
  Json::Value root;
  std::string errors;
  if (!parse_json_strict(text, &root, &errors)) return syntax_error(errors, at);
  if (!root.isObject()) return at.error(root, "the file is a JSON object with 'policies'");
  for (const std::string& key : root.getMemberNames()) {
    if (key != "policies") return at.error(root[key], str_cat("unknown key '", printable(key, 64), "' (policies)"));
  }
  const Json::Value& policies = root["policies"];
  if (!policies.isObject()) return at.error(root.isMember("policies") ? policies : root, "'policies' (an object of named policies) is required");
  if (policies.size() > kMaxPolicies) return at.error(policies, str_cat("more than ", kMaxPolicies, " policies"));
  PolicySet set;
  set.source = source;
  set.sha256 = hex_encode(sha256(text));
  set.text = std::string(text);
  for (const std::string& name : policies.getMemberNames()) {
    auto p = parse_one(name, policies[name], at);
    if (!p.is_ok()) return p.status();
    set.policies.emplace(name, std::move(p).value());
  }
  return set;
}

Status evaluate_named_policy(const NamedPolicy& p, const Identity& identity, int64_t now) {
  if (identity.platform != p.platform) {
    return Status::error(ErrorKind::kRefused, str_cat("policy ", p.name, ": platform ", identity.platform,
                                                      ", not ", p.platform));
  }
  for (const auto& [claim, allowed] : p.require) {
    const std::string got = identity.claim(claim);
    if (std::find(allowed.begin(), allowed.end(), got) == allowed.end()) {
      return Status::error(ErrorKind::kRefused, str_cat("policy ", p.name, ": ", claim, " ",
                                                        got.empty() ? "-" : printable(got, 128),
                                                        " is not allowed"));
    }
  }
  if (!p.days_utc.empty()) {
    const int today = weekday_utc(now);
    if (p.days_utc.count(today) == 0) {
      std::string allowed;
      for (int d : p.days_utc) allowed += str_cat(allowed.empty() ? "" : ",", kDays[d]);
      return Status::error(ErrorKind::kRefused, str_cat("policy ", p.name, ": not on its days (", allowed,
                                                        " UTC; today ", kDays[today], ")"));
    }
  }
  if (p.hours_utc) {
    const int minute = static_cast<int>(((now % 86400) + 86400) % 86400 / 60);
    const auto [start, end] = *p.hours_utc;
    const bool inside = start < end ? (minute >= start && minute < end) : (minute >= start || minute < end);
    if (!inside) {
      return Status::error(ErrorKind::kRefused, str_cat("policy ", p.name, ": outside its hours (",
                                                        clock_text(start), "-", clock_text(end), " UTC; now ",
                                                        clock_text(minute), ")"));
    }
  }
  return Status::ok();
}

Result<PolicySet> read_policy_file(const std::string& path) {
  auto text = read_small_file(path, kMaxPolicyFile + 1);
  if (!text.is_ok()) return text.status();
  return parse_policy_file(text.value(), path);
}

Result<std::shared_ptr<const PolicySet>> PolicyRegistry::load(const std::string& path,
                                                              const std::string& loaded_by) {
  auto set = read_policy_file(path);
  if (!set.is_ok()) return set.status();
  set->loaded_by = loaded_by;
  auto loaded = std::make_shared<const PolicySet>(std::move(set).value());
  install(loaded);
  return loaded;
}

void PolicyRegistry::install(std::shared_ptr<const PolicySet> set) {
  std::lock_guard<std::mutex> lock(mu_);
  if (current_ != nullptr && set->version != 0 && current_->version > set->version) return;
  current_ = std::move(set);
}

std::shared_ptr<const PolicySet> PolicyRegistry::current() const {
  std::lock_guard<std::mutex> lock(mu_);
  return current_;
}

}  // namespace keygate::server
