#include "server/settings.h"

#include <unistd.h>

#include <cctype>
#include <set>

#include "core/encoding.h"
#include "core/file.h"
#include "core/json.h"

namespace keygate::server {
namespace {

// Paths, addresses and names: printable, bounded.
constexpr size_t kMaxSettingText = 4096;
constexpr size_t kMaxListEntries = 256;

// "connections": {"max": 8192, "per_source": 128}
Status read_connection_caps(const Json::Value& c, Settings* s) {
  const Json::Value& caps = c["connections"];
  if (caps.isNull()) return Status::ok();
  auto bad = [](const std::string& what) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("connections: ", what));
  };
  if (!caps.isObject()) return bad("must be an object");
  for (const auto& name : caps.getMemberNames()) {
    if (name != "max" && name != "per_source") return bad(str_cat("unknown key '", printable(name, 32), "'"));
    if (!caps[name].isInt() || caps[name].asInt() < 1 || caps[name].asInt() > 1000000) {
      return bad(str_cat(name, " must be a whole number from 1 to 1000000"));
    }
  }
  if (caps.isMember("max")) s->max_connections = caps["max"].asInt();
  if (caps.isMember("per_source")) s->max_connections_per_source = caps["per_source"].asInt();
  if (s->max_connections_per_source > s->max_connections) return bad("per_source is more than max");
  return Status::ok();
}

// "rate_limits": {"per_source": {"per_second": 50, "burst": 100},
//                 "per_instance": {"per_second": 1, "burst": 20}}
// (per_second 0: no limit).
Status read_rate_limits(const Json::Value& c, Settings* s) {
  const Json::Value& limits = c["rate_limits"];
  if (limits.isNull()) return Status::ok();
  auto bad = [](const std::string& what) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("rate_limits: ", what));
  };
  if (!limits.isObject()) return bad("must be an object");
  for (const auto& name : limits.getMemberNames()) {
    RateLimit* target = name == "per_source" ? &s->per_source
                        : name == "per_instance" ? &s->per_instance : nullptr;
    if (target == nullptr) return bad(str_cat("unknown key '", printable(name, 32), "'"));
    const Json::Value& l = limits[name];
    if (!l.isObject() || !l["per_second"].isNumeric() || !l["burst"].isNumeric() || l.size() != 2) {
      return bad(str_cat(name, " needs exactly per_second and burst, as numbers"));
    }
    const double rate = l["per_second"].asDouble(), burst = l["burst"].asDouble();
    if (!(rate >= 0 && rate <= 1e6) || !(burst >= 1 && burst <= 1e6)) {
      return bad(str_cat(name, ": per_second from 0 (no limit) to 1e6, burst from 1 to 1e6"));
    }
    *target = RateLimit{rate, burst};
  }
  return Status::ok();
}

// "enroll_by_attestation": [{"platform": "aws", "require": {...}}, ...]
// Each rule admits per-instance enrollment without a token, so it must at
// least bind what every policy of its platform binds (the account).
Status read_attestation_rules(const Json::Value& c, std::vector<EnrollmentTemplate>* out) {
  const Json::Value& rules = c["enroll_by_attestation"];
  if (rules.isNull()) return Status::ok();
  if (!rules.isArray() || rules.size() > 64) {
    return Status::error(ErrorKind::kInvalidArgument, "'enroll_by_attestation' must be a list of rules");
  }
  for (Json::ArrayIndex i = 0; i < rules.size(); ++i) {
    auto rule = EnrollmentTemplate::from_json(rules[i]);
    if (!rule.is_ok()) return rule.status().with_context(str_cat("enroll_by_attestation[", i, "]"));
    Status ok = check_attestation_rule(rule.value());
    if (!ok.is_ok()) return ok.with_context(str_cat("enroll_by_attestation[", i, "]"));
    out->push_back(std::move(rule).value());
  }
  return Status::ok();
}

Status read_string_list(const Json::Value& c, const char* key, std::vector<std::string>* out) {
  if (!c.isMember(key)) return Status::ok();
  if (c[key].isArray() && c[key].size() > kMaxListEntries) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("'", key, "' has more than ", kMaxListEntries, " entries"));
  }
  if (!c[key].isArray()) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("'", key, "' must be a list of strings"));
  }
  for (const auto& d : c[key]) {
    if (!d.isString() || d.asString().empty() || d.asString().size() > kMaxSettingText ||
        !is_display_text(d.asString())) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("'", key, "' must be a list of strings (printable text, 1 to ",
                                   kMaxSettingText, " bytes)"));
    }
    out->push_back(d.asString());
  }
  return Status::ok();
}

// "webhook": {"url": "https://...", "ca_file": PATH, "secret_file": PATH,
//             "refusal_spike": 60}
Status read_webhook(const Json::Value& c, WebhookOptions* out) {
  const Json::Value& w = c["webhook"];
  if (w.isNull()) return Status::ok();
  auto bad = [](const std::string& what) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("webhook: ", what));
  };
  if (!w.isObject()) return bad("must be an object");
  for (const auto& name : w.getMemberNames()) {
    if (name == "refusal_spike") {
      const Json::Value& v = w[name];
      if (!v.isIntegral() || !v.isInt() || v.asInt() < 0 || v.asInt() > 1000000) {
        return bad("refusal_spike must be a whole number of refusals a minute, from 0 (never) to 1000000");
      }
      out->refusal_spike = v.asInt();
      continue;
    }
    std::string* target = name == "url" ? &out->url : name == "ca_file" ? &out->ca_file
                          : name == "secret_file" ? &out->secret_file : nullptr;
    if (target == nullptr) return bad(str_cat("unknown key '", printable(name, 32), "'"));
    const Json::Value& v = w[name];
    if (!v.isString() || v.asString().empty() || v.asString().size() > kMaxSettingText ||
        !is_display_text(v.asString())) {
      return bad(str_cat(name, " must be a string (printable text, 1 to ", kMaxSettingText, " bytes)"));
    }
    *target = v.asString();
  }
  if (out->url.empty() || out->ca_file.empty() || out->secret_file.empty()) {
    return bad("needs url, ca_file and secret_file");
  }
  if (out->url.rfind("https://", 0) != 0 || out->url.size() <= 8) return bad("url must be https://HOST[:PORT]/PATH");
  return Status::ok();
}

Status bad_key(const char* key, const std::string& what) {
  return Status::error(ErrorKind::kInvalidArgument, str_cat("'", key, "' ", what));
}

Status read_text(const Json::Value& c, const char* key, std::string* out) {
  if (!c.isMember(key)) return Status::ok();
  const Json::Value& v = c[key];
  if (!v.isString() || v.asString().empty() || v.asString().size() > kMaxSettingText ||
      !is_display_text(v.asString())) {
    return bad_key(key, str_cat("must be a string (printable text, 1 to ", kMaxSettingText, " bytes)"));
  }
  *out = v.asString();
  return Status::ok();
}

Status read_seconds(const Json::Value& c, const char* key, long min, long max, const char* range,
                    long* out) {
  if (!c.isMember(key)) return Status::ok();
  const Json::Value& v = c[key];
  if (!v.isIntegral() || !v.isInt64() || v.asInt64() < min || v.asInt64() > max) {
    return bad_key(key, str_cat("must be whole seconds, from ", range));
  }
  *out = static_cast<long>(v.asInt64());
  return Status::ok();
}

}  // namespace

Result<Settings> parse_settings(std::string_view text) {
  auto cfg = parse_json_object(text, kMaxSettingsFile);
  if (!cfg.is_ok()) return cfg.status();
  const Json::Value& c = cfg.value();
  static const std::set<std::string> kKeys = {"listen",
                                              "state_dir",
                                              "aws_trust_dirs",
                                              "gcp_jwks_files",
                                              "azure_trust_dirs",
                                              "evidence_max_age",
                                              "tls_san",
                                              "nonce_ttl",
                                              "enroll_by_attestation",
                                              "rate_limits",
                                              "connections",
                                              "pending_ttl",
                                              "policy_file",
                                              "store",
                                              "store_connections",
                                              "webhook"};
  for (const auto& key : c.getMemberNames()) {
    if (!kKeys.count(key)) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("unknown key '", printable(key, 64), "'"));
    }
  }
  Settings s;
  for (Status st :
       {read_text(c, "listen", &s.listen), read_text(c, "state_dir", &s.state_dir),
        read_text(c, "policy_file", &s.policy_file), read_text(c, "store", &s.store),
        read_seconds(c, "nonce_ttl", 1, 3600, "1 to 3600", &s.nonce_ttl),
        read_seconds(c, "evidence_max_age", 10, 6 * 3600, "10 to 21600", &s.evidence_max_age),
        read_seconds(c, "pending_ttl", 60, 90 * 86400, "60 to 7776000 (90 days)", &s.pending_ttl),
        read_rate_limits(c, &s), read_connection_caps(c, &s), read_webhook(c, &s.webhook),
        read_attestation_rules(c, &s.attestation_enrollment)}) {
    if (!st.is_ok()) return st;
  }
  for (auto [key, list] : {std::pair{"aws_trust_dirs", &s.aws_trust_dirs},
                           std::pair{"gcp_jwks_files", &s.gcp_jwks_files},
                           std::pair{"azure_trust_dirs", &s.azure_trust_dirs},
                           std::pair{"tls_san", &s.tls_san}}) {
    KEYGATE_RETURN_IF_ERROR(read_string_list(c, key, list));
  }
  if (!s.store.empty()) {
    Status st = check_postgres_conninfo(s.store);
    if (!st.is_ok()) return bad_key("store", st.message().substr(st.message().find(": ") + 2));
  }
  if (c.isMember("store_connections")) {
    const Json::Value& v = c["store_connections"];
    if (!v.isIntegral() || !v.isInt64() || v.asInt64() < 1 || v.asInt64() > 256) {
      return bad_key("store_connections", "must be a whole number from 1 to 256");
    }
    s.store_connections = static_cast<int>(v.asInt64());
  }
  return s;
}

// The store: PostgreSQL when the settings or the state folder's store.conf
// name a database, else the embedded SQLite store in the state folder.
Result<std::unique_ptr<Store>> open_store(const Settings& s) {
  KEYGATE_RETURN_IF_ERROR(ensure_state_dir(s.state_dir));
  std::string conninfo = s.store;
  const std::string conf = s.state_dir + "/store.conf";
  if (conninfo.empty() && access(conf.c_str(), F_OK) == 0) {
    auto text = read_small_file(conf, 4096);
    if (!text.is_ok()) return text.status();
    conninfo = text.value();
    while (!conninfo.empty() && std::isspace(static_cast<unsigned char>(conninfo.back())))
      conninfo.pop_back();
    if (conninfo.empty())
      return Status::error(ErrorKind::kInvalidArgument, str_cat(conf, ": empty"));
    KEYGATE_RETURN_IF_ERROR(check_postgres_conninfo(conninfo).with_context(conf));
  }
  if (conninfo.empty()) return open_sqlite_store(s.state_dir + "/keygate.db");
  return open_postgres_store(conninfo, s.store_connections);
}

}  // namespace keygate::server
