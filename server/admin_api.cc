#include "server/admin_api.h"

#include <deque>
#include <map>
#include <set>
#include <vector>

#include "core/encoding.h"
#include "core/json.h"
#include "core/log.h"
#include "core/protocol.h"
#include "server/audit_chain.h"
#include "server/key_service.h"
#include "server/policy.h"
#include "server/volume_edits.h"

namespace keygate::server {
namespace {

constexpr int kMaxListed = 1000;
constexpr int64_t kMaxTokenTtl = 30 * 86400;
constexpr int64_t kMaxTokenUses = 100000;
constexpr size_t kMaxPublicKeyPem = 4096;

// "/v1/admin/requests/req-x/approve?all=1" -> {"requests", "req-x", "approve"}, "all=1"
std::vector<std::string> split_path(std::string_view path) {
  std::vector<std::string> parts;
  size_t at = 0;
  while (at <= path.size()) {
    const size_t slash = path.find('/', at);
    const size_t end = slash == std::string_view::npos ? path.size() : slash;
    parts.emplace_back(path.substr(at, end - at));
    at = end + 1;
  }
  return parts;
}

ApiResponse ok(Json::Value body) {
  ApiResponse r;
  r.body = std::move(body);
  return r;
}

Json::Value cert_json(const AdminCertRecord& c) {
  Json::Value v(Json::objectValue);
  v["serial"] = c.serial;
  v["name"] = c.name;
  v["role"] = c.role;
  v["issued_by"] = c.issued_by;
  v["issued_at"] = static_cast<Json::Int64>(c.issued_at);
  v["expires_at"] = static_cast<Json::Int64>(c.expires_at);
  v["revoked_at"] = static_cast<Json::Int64>(c.revoked_at);
  return v;
}

bool is_serial(std::string_view s) {
  if (s.empty() || s.size() > 40) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

}  // namespace

Json::Value volume_json(const VolumeRecord& v) {
  Json::Value item(Json::objectValue);
  item["id"] = v.id;
  item["state"] = volume_state_name(v.state);
  auto policy = parse_json_object(v.policy_json);
  item["policy"] = policy.is_ok() ? policy.value() : Json::Value();
  item["description"] = v.description;
  item["created_at"] = static_cast<Json::Int64>(v.created_at);
  item["updated_at"] = static_cast<Json::Int64>(v.updated_at);
  return item;
}

struct AdminService::Request {
  std::string method;
  std::vector<std::string> path;  // after /v1/admin/
  std::string query;
  std::string_view body;
  const std::string& source;
  std::string who;  // the person, for the trail
  Json::Value json;  // the parsed body of a POST
};

AdminService::AdminService(Store& store, const Clock& clock, const AdminCa& ca, const PolicyRegistry* policies,
                           PolicyReload reload, Operations* operations)
    : store_(store), clock_(clock), ca_(ca), policies_(policies), reload_(std::move(reload)),
      operations_(operations) {}

AuditEvent AdminService::admin_event(const Request& request, const char* event, const char* outcome,
                                     const std::string& volume_id, const std::string& detail) {
  return AuditEvent{clock_.now_unix(), event, outcome, volume_id, request.source,
                    str_cat("by ", request.who, detail.empty() ? "" : ": ", detail)};
}

Status AdminService::audit(const Request& request, const char* event, const char* outcome,
                           const std::string& volume_id, const std::string& detail) {
  const AuditEvent e = admin_event(request, event, outcome, volume_id, detail);
  Status s = store_.append_audit(e);
  log_admin_event(e, s);
  return s;
}

void AdminService::log_admin_event(const AuditEvent& e, const Status& s) {
  const std::string& volume_id = e.volume_id;
  const std::string line = str_cat(e.event, " ", e.outcome, " volume=", volume_id.empty() ? "-" : volume_id,
                                   " peer=", e.peer, " detail=", printable(e.detail, 1024));
  if (!s.is_ok()) {
    log_error(str_cat("audit write failed (", line, "): ", s.message()));
    if (operations_ != nullptr) operations_->audit_failed(e, s.message());
  } else if (e.outcome == "refused") {
    log_warning(line);
  } else {
    log_info(line);
  }
}

ApiResponse AdminService::refuse(const Request& request, const char* event, int status, const char* code,
                                 const std::string& volume_id, const std::string& why) {
  (void)audit(request, event, "refused", volume_id, why);
  return error_response(status, code, why);
}

std::optional<ApiResponse> AdminService::sign_in(const AdminPeer* peer, Request& request, AdminIdentity* out) {
  if (peer == nullptr) {
    return error_response(401, admin_error::kUnauthenticated,
                          "the admin API needs a client certificate of this key server's admin CA");
  }
  request.who = str_cat(printable(peer->name, kMaxAdminNameLength), " (", peer->serial, ")");
  auto who = authenticate_admin(store_, *peer, clock_.now_unix());
  if (!who.is_ok()) {
    if (who.status().kind() != ErrorKind::kRefused) {
      log_error(str_cat("admin API: ", who.status().message()));
      return error_response(500, api::kErrInternal, "internal error");
    }
    return refuse(request, "admin.auth", 401, admin_error::kUnauthenticated, "", who.status().message());
  }
  request.who = str_cat(who->name, " (", admin_role_name(who->role), ")");
  *out = std::move(who).value();
  return std::nullopt;
}

namespace {

// Whether a POST came from a page of this server (see admin_api.h); the
// reason if not.
std::optional<std::string> cross_site(const AdminRequestHeaders& h) {
  const std::string_view type(h.content_type);
  const std::string_view media = type.substr(0, type.find(';'));
  if (media != "application/json") return "a change needs Content-Type: application/json";
  if (!h.origin.empty() && h.origin != str_cat("https://", h.host)) {
    return "a change from a page of another origin is refused";
  }
  if (!h.sec_fetch_site.empty() && h.sec_fetch_site != "same-origin" && h.sec_fetch_site != "none") {
    return "a change from a page of another site is refused";
  }
  return std::nullopt;
}

}  // namespace

ApiResponse AdminService::handle(const AdminPeer* peer, std::string_view method, std::string_view target,
                                 std::string_view body, const std::string& source,
                                 const AdminRequestHeaders& headers) {
  std::string_view path = target.substr(std::string_view(kAdminPathPrefix).size());
  std::string query;
  if (const size_t q = path.find('?'); q != std::string_view::npos) {
    query = std::string(path.substr(q + 1));
    path = path.substr(0, q);
  }
  Request request{std::string(method), split_path(path), query, body, source, "-", Json::Value()};
  AdminIdentity who;
  if (auto refused = sign_in(peer, request, &who)) return *refused;
  if (request.method == "POST") {
    if (auto why = cross_site(headers)) {
      return refuse(request, "admin.csrf", 403, admin_error::kForbidden, "", *why);
    }
    auto parsed = body.empty() ? Result<Json::Value>(Json::Value(Json::objectValue))
                               : parse_json_object(body, api::kMaxRequestBody);
    if (!parsed.is_ok()) return error_response(400, api::kErrBadRequest, parsed.status().message());
    request.json = std::move(parsed).value();
  } else if (request.method != "GET") {
    return error_response(405, api::kErrMethodNotAllowed, "method not allowed");
  }
  return route(who, request);
}

ApiResponse AdminService::console(const AdminPeer* peer, std::string_view target, const std::string& source) {
  std::string_view path = target.substr(std::string_view(kConsolePathPrefix).size());
  path = path.substr(0, path.find('?'));
  if (path.empty()) path = "index.html";
  Request request{"GET", {}, "", {}, source, "-", Json::Value()};
  AdminIdentity who;
  if (auto refused = sign_in(peer, request, &who)) return *refused;
  for (size_t i = 0; i < kConsoleAssetCount; ++i) {
    const ConsoleAsset& a = kConsoleAssets[i];
    if (path != a.path) continue;
    ApiResponse r;
    r.content_type = str_cat(a.content_type, "; charset=utf-8");
    r.text = std::string(a.body);
    return r;
  }
  return error_response(404, api::kErrNotFound, "no such page");
}

ApiResponse AdminService::metrics(const AdminPeer* peer, const std::string& source, int open_connections) {
  Request request{"GET", {}, "", {}, source, "-", Json::Value()};
  AdminIdentity who;
  if (auto refused = sign_in(peer, request, &who)) return *refused;
  if (operations_ == nullptr) return error_response(404, api::kErrNotFound, "no metrics here");
  auto nonces = store_.count_nonces(clock_.now_unix());
  ApiResponse r;
  r.content_type = "text/plain; version=0.0.4; charset=utf-8";
  r.text = operations_->render(nonces.is_ok() ? nonces.value() : -1, open_connections);
  return r;
}

ApiResponse AdminService::route(const AdminIdentity& who, Request& r) {
  const auto& p = r.path;
  const bool get = r.method == "GET";
  auto needs = [&](AdminRole role, const char* event) -> std::optional<ApiResponse> {
    if (who.role >= role) return std::nullopt;
    return refuse(r, event, 403, admin_error::kForbidden,
                  "", str_cat(who.name, " is ", admin_role_name(who.role), "; this needs the ",
                              admin_role_name(role), " role"));
  };
  auto not_found = [] { return error_response(404, api::kErrNotFound, "no such admin endpoint"); };
  if (p.size() == 1 && p[0] == "whoami" && get) {
    Json::Value v(Json::objectValue);
    v["name"] = who.name;
    v["role"] = admin_role_name(who.role);
    v["serial"] = who.serial;
    return ok(v);
  }
  if (!p.empty() && p[0] == "requests") {
    if (p.size() == 1 && get) return list_requests(r);
    if (p.size() == 2 && get) return show_request(p[1]);
    if (p.size() == 3 && !get && (p[2] == "approve" || p[2] == "deny")) {
      const bool approve = p[2] == "approve";
      if (auto no = needs(AdminRole::kApprover, approve ? "approval.approve" : "approval.deny")) return *no;
      return decide(who, r, p[1], approve);
    }
    return not_found();
  }
  if (!p.empty() && p[0] == "volumes") {
    if (p.size() == 1 && get) return list_volumes();
    if (p.size() == 2 && get) return show_volume(p[1]);
    if (p.size() == 3 && !get && p[2] == "revoke") {
      if (auto no = needs(AdminRole::kAdmin, "revoke")) return *no;
      return revoke_volume(who, r, p[1]);
    }
    if (p.size() == 3 && !get && p[2] == "rotate") {
      if (auto no = needs(AdminRole::kAdmin, "rotate.request")) return *no;
      return rotate_volume(who, r, p[1]);
    }
    if (p.size() == 3 && !get && p[2] == "revoke-instance") {
      if (auto no = needs(AdminRole::kAdmin, "revoke.instance")) return *no;
      return revoke_instance(r, p[1]);
    }
    return not_found();
  }
  if (p.size() == 1 && p[0] == "instances" && get) return list_instances();
  if (p.size() == 1 && p[0] == "tokens" && !get) {
    if (auto no = needs(AdminRole::kAdmin, "token.create")) return *no;
    return create_token(who, r);
  }
  if (p.size() == 1 && p[0] == "audit" && get) return list_audit(r);
  if (!p.empty() && p[0] == "certs") {
    if (p.size() == 1 && get) return list_certs();
    if (p.size() == 1 && !get) {
      if (auto no = needs(AdminRole::kAdmin, "admin.cert.issue")) return *no;
      return issue_cert(who, r);
    }
    if (p.size() == 3 && !get && p[2] == "revoke") {
      if (auto no = needs(AdminRole::kAdmin, "admin.cert.revoke")) return *no;
      return revoke_cert(who, r, p[1]);
    }
    return not_found();
  }
  if (p.size() == 2 && p[0] == "policy" && p[1] == "reload" && !get) {
    if (auto no = needs(AdminRole::kAdmin, "policy.load")) return *no;
    return reload_policy(who, r);
  }
  return not_found();
}

namespace {

constexpr size_t kMaxFilterText = 256;
constexpr int kDefaultAuditListed = 200;

// "a=1&b=x%20y" -> {{"a","1"},{"b","x y"}}; null if malformed (a bad %
// escape, a key without '=', a value that is not printable text).
std::optional<std::map<std::string, std::string>> parse_query(std::string_view query) {
  std::map<std::string, std::string> out;
  if (query.empty()) return out;
  size_t at = 0;
  while (at <= query.size()) {
    const size_t amp = std::min(query.find('&', at), query.size());
    const std::string_view pair = query.substr(at, amp - at);
    const size_t eq = pair.find('=');
    if (eq == std::string_view::npos || eq == 0) return std::nullopt;
    std::string value;
    for (size_t i = eq + 1; i < pair.size(); ++i) {
      if (pair[i] == '+') {
        value += ' ';
      } else if (pair[i] == '%') {
        auto byte = hex_decode(pair.substr(i + 1, 2));
        if (i + 2 >= pair.size() || !byte.is_ok() || byte->size() != 1) return std::nullopt;
        value += static_cast<char>(byte.value()[0]);
        i += 2;
      } else {
        value += pair[i];
      }
    }
    if (value.size() > kMaxFilterText || !is_display_text(value)) return std::nullopt;
    out[std::string(pair.substr(0, eq))] = value;
    at = amp + 1;
  }
  return out;
}

Json::Value audit_record_view(const AuditRecord& r) {
  Json::Value v(Json::objectValue);
  v["seq"] = static_cast<Json::Int64>(r.seq);
  v["time"] = static_cast<Json::Int64>(r.event.time);
  v["event"] = r.event.event;
  v["outcome"] = r.event.outcome;
  v["volume_id"] = r.event.volume_id;
  v["peer"] = r.event.peer;
  v["detail"] = r.event.detail;
  return v;
}

}  // namespace

// GET audit?volume=&instance=&event=&outcome=&since=&until=&limit=: the
// newest `limit` records that match (newest first), and whether the whole
// chain verifies. `event` ending in '.' matches every event it begins
// ("approval."); `instance` matches records whose detail names it.
ApiResponse AdminService::list_audit(Request& r) {
  auto q = parse_query(r.query);
  if (!q) return error_response(400, api::kErrBadRequest, "malformed query (key=value&..., printable values)");
  static const std::set<std::string> kKeys = {"volume", "instance", "event", "outcome", "since", "until", "limit"};
  for (const auto& [k, v] : *q) {
    if (kKeys.count(k) == 0) {
      return error_response(400, api::kErrBadRequest,
                            "unknown filter (volume, instance, event, outcome, since, until, limit)");
    }
  }
  auto number = [&](const char* key, int64_t fallback, int64_t min, int64_t max) -> std::optional<int64_t> {
    auto it = q->find(key);
    if (it == q->end() || it->second.empty()) return fallback;
    int64_t n = 0;
    for (char c : it->second) {
      if (c < '0' || c > '9' || n > max / 10) return std::nullopt;
      n = n * 10 + (c - '0');
    }
    if (n < min || n > max) return std::nullopt;
    return n;
  };
  const auto since = number("since", 0, 0, int64_t{1} << 40);
  const auto until = number("until", int64_t{1} << 40, 0, int64_t{1} << 40);
  const auto limit = number("limit", kDefaultAuditListed, 1, kMaxListed);
  if (!since || !until || !limit) {
    return error_response(400, api::kErrBadRequest,
                          str_cat("since and until are unix seconds; limit is 1 to ", kMaxListed));
  }
  auto filter = [&](const char* key) { return q->count(key) ? q->at(key) : std::string(); };
  const std::string volume = filter("volume"), instance = filter("instance"), event = filter("event"),
                    outcome = filter("outcome");
  auto matches = [&](const AuditEvent& e) {
    if (!volume.empty() && e.volume_id != volume) return false;
    if (!outcome.empty() && e.outcome != outcome) return false;
    if (!event.empty() && (event.back() == '.' ? e.event.rfind(event, 0) != 0 : e.event != event)) return false;
    if (!instance.empty() && e.detail.find(instance) == std::string::npos) return false;
    return e.time >= *since && e.time <= *until;
  };
  // The whole trail is read, to verify its chain; only the newest matches
  // are kept.
  AuditChainVerifier verifier;
  std::deque<AuditRecord> kept;
  int64_t matched = 0;
  for (int64_t after = 0;;) {
    auto page = store_.read_audit(after, 1000);
    if (!page.is_ok()) {
      log_error(str_cat("admin API: audit: ", page.status().message()));
      return error_response(503, api::kErrAuditUnavailable, "the audit trail cannot be read now");
    }
    for (auto& record : page.value()) {
      (void)verifier.add(record);
      after = record.seq;
      if (!matches(record.event)) continue;
      ++matched;
      kept.push_back(std::move(record));
      if (static_cast<int64_t>(kept.size()) > *limit) kept.pop_front();
    }
    if (page->size() < 1000) break;
  }
  Json::Value records(Json::arrayValue);
  for (auto it = kept.rbegin(); it != kept.rend(); ++it) records.append(audit_record_view(*it));
  Json::Value chain(Json::objectValue);
  const Status verified = verifier.finish();
  chain["verified"] = verified.is_ok();
  chain["records"] = static_cast<Json::Int64>(verifier.count());
  chain["head"] = verifier.count() > 0 ? format_audit_head(verifier.head()) : "";
  if (!verified.is_ok()) chain["error"] = verified.message();
  Json::Value v(Json::objectValue);
  v["records"] = records;
  v["matched"] = static_cast<Json::Int64>(matched);
  v["chain"] = chain;
  return ok(v);
}

ApiResponse AdminService::list_requests(Request& r) {
  const bool all = r.query == "all=1";
  if (!r.query.empty() && !all) return error_response(400, api::kErrBadRequest, "the only query is all=1");
  auto list = store_.list_approvals(!all, kMaxListed);
  if (!list.is_ok()) return error_response(500, api::kErrInternal, "approval requests unavailable");
  const int64_t now = clock_.now_unix();
  Json::Value out(Json::arrayValue);
  for (const auto& record : list.value()) {
    auto a = Approval::from_record(record);
    if (!a.is_ok()) {
      log_error(a.status().message());
      continue;
    }
    if (!all && a->state_at(now) != "pending") continue;  // expired, not yet recorded so
    out.append(a->to_json(now));
  }
  Json::Value v(Json::objectValue);
  v["requests"] = out;
  return ok(v);
}

std::optional<ApiResponse> AdminService::load_request(const std::string& id, Approval* out) {
  if (!is_approval_id(id)) return error_response(400, api::kErrBadRequest, "not a request id");
  auto record = store_.get_approval(id);
  if (!record.is_ok()) {
    if (record.status().kind() == ErrorKind::kNotFound) {
      return error_response(404, api::kErrNotFound, str_cat("no approval request ", id));
    }
    return error_response(500, api::kErrInternal, "approval requests unavailable");
  }
  auto a = Approval::from_record(record.value());
  if (!a.is_ok()) return error_response(500, api::kErrInternal, "approval request unreadable");
  *out = std::move(a).value();
  return std::nullopt;
}

ApiResponse AdminService::show_request(const std::string& id) {
  Approval a;
  if (auto failed = load_request(id, &a)) return *failed;
  return ok(a.to_json(clock_.now_unix()));
}

ApiResponse AdminService::decide(const AdminIdentity& who, Request& r, const std::string& id, bool approve) {
  const char* event = approve ? "approval.approve" : "approval.deny";
  auto reason = json_optional_text(r.json, "reason", kMaxDecisionReason);
  if (!reason.is_ok()) return error_response(400, api::kErrBadRequest, reason.status().message());
  if (reason->empty()) {
    return error_response(400, api::kErrBadRequest, "a decision needs a reason (\"reason\", 1 to 256 characters)");
  }
  Approval a;
  if (auto failed = load_request(id, &a)) return *failed;
  const int64_t now = clock_.now_unix();
  const std::string state = a.state_at(now);
  if (state != "pending") {
    return refuse(r, event, 409, admin_error::kConflict, a.volume_id,
                  str_cat("request ", id, " is ", state, ", not pending"));
  }
  if (approve) {
    Status allowed = may_approve(a, who);
    if (!allowed.is_ok()) return refuse(r, event, 403, admin_error::kForbidden, a.volume_id, allowed.message());
  }
  Approval decided = a;
  const ApprovalDecision decision{who.name, reason.value(), now};
  std::string outcome = "ok";
  if (approve) {
    decided.approvals.push_back(decision);
    if (static_cast<int>(decided.approvals.size()) >= decided.needed) {
      decided.state = "approved";
      outcome = "approved";
    }
  } else {
    decided.denial = decision;
    decided.state = "denied";
    outcome = "denied";
  }
  const AuditEvent e{now, event, outcome, a.volume_id, r.source,
                     str_cat(id, " by ", r.who, " (", decided.approvals.size(), " of ", a.needed,
                             " approvals; instance ", a.instance, "): ", reason.value())};
  Status s = store_.update_approval(a.to_record(), decided.to_record(), e);
  if (s.kind() == ErrorKind::kConflict) {
    return error_response(409, admin_error::kConflict, str_cat("request ", id, " changed meanwhile; look again"));
  }
  if (!s.is_ok()) {
    log_error(str_cat("admin API: ", event, " ", id, ": ", s.message()));
    return error_response(503, api::kErrAuditUnavailable, "the decision could not be recorded; nothing changed");
  }
  log_info(str_cat(event, " ", outcome, " volume=", a.volume_id, " peer=", r.source, " detail=",
                   printable(e.detail, 1024)));
  if (operations_ != nullptr) operations_->approval_decided(decided, approve, who.name, reason.value(), now);
  return ok(decided.to_json(now));
}

// {"<key>": [each of `items` as `as_json` shows it]}, or a 500 naming `what`.
template <typename T>
ApiResponse list_of(const Result<std::vector<T>>& items, const char* key, Json::Value (*as_json)(const T&),
                    const char* what) {
  if (!items.is_ok()) return error_response(500, api::kErrInternal, str_cat(what, " unavailable"));
  Json::Value out(Json::arrayValue);
  for (const auto& item : items.value()) out.append(as_json(item));
  Json::Value v(Json::objectValue);
  v[key] = out;
  return ok(v);
}

ApiResponse AdminService::list_volumes() { return list_of(store_.list_volumes(), "volumes", &volume_json, "volumes"); }

std::optional<ApiResponse> AdminService::load_volume(const std::string& id, VolumeRecord* out) {
  if (!api::is_valid_volume_id(id)) return error_response(400, api::kErrBadRequest, "not a volume id");
  auto record = store_.get_volume(id);
  if (!record.is_ok()) {
    if (record.status().kind() == ErrorKind::kNotFound) return error_response(404, api::kErrNotFound, str_cat("no volume ", id));
    return error_response(500, api::kErrInternal, "volumes unavailable");
  }
  *out = std::move(record).value();
  return std::nullopt;
}

ApiResponse AdminService::list_instances() {
  auto volumes = store_.list_volumes();
  if (!volumes.is_ok()) return error_response(500, api::kErrInternal, "volumes unavailable");
  Json::Value out(Json::arrayValue);
  auto add = [&out](const std::string& instance, const VolumePolicy& policy, const VolumeRecord& v, const char* how) {
    Json::Value one(Json::objectValue);
    one["instance"] = instance;
    one["platform"] = policy.platform;
    one["volume_id"] = v.id;
    one["volume_state"] = volume_state_name(v.state);
    one["relation"] = how;
    out.append(one);
  };
  for (const auto& v : volumes.value()) {
    auto json = parse_json_object(v.policy_json);
    auto policy = json.is_ok() ? VolumePolicy::from_json(json.value()) : Result<VolumePolicy>(json.status());
    if (!policy.is_ok()) continue;
    const PlatformSpec* spec = platform_spec(policy->platform);
    if (spec != nullptr && policy->require.count(spec->instance_claim) != 0) {
      add(policy->require.at(spec->instance_claim), policy.value(), v, "bound");
    }
    for (const auto& i : policy->known_instances) add(i, policy.value(), v, "known");
    for (const auto& i : policy->revoked_instances) add(i, policy.value(), v, "revoked");
  }
  Json::Value body(Json::objectValue);
  body["instances"] = out;
  return ok(body);
}

ApiResponse AdminService::show_volume(const std::string& id) {
  VolumeRecord record;
  if (auto failed = load_volume(id, &record)) return *failed;
  return ok(volume_json(record));
}

ApiResponse AdminService::revoke_instance(Request& r, const std::string& id) {
  if (!api::is_valid_volume_id(id)) return error_response(400, api::kErrBadRequest, "not a volume id");
  auto instance = json_string(r.json, "instance", 512);
  if (!instance.is_ok()) return error_response(400, api::kErrBadRequest, instance.status().message());
  auto edit = edit_volume_policy(store_, clock_, id, "revoke.instance", r.source, str_cat("by ", r.who, ": "),
                                 revoke_instance_change(id, instance.value()));
  if (!edit.is_ok()) {
    const Status& s = edit.status();
    if (s.kind() == ErrorKind::kNotFound) return error_response(404, api::kErrNotFound, s.message());
    if (s.kind() == ErrorKind::kInvalidArgument) return error_response(400, api::kErrBadRequest, s.message());
    if (s.kind() == ErrorKind::kConflict) return error_response(409, admin_error::kConflict, s.message());
    log_error(str_cat("admin API: revoke instance: ", s.message()));
    return error_response(500, api::kErrInternal, "the instance could not be revoked");
  }
  Json::Value v(Json::objectValue);
  v["id"] = id;
  v["result"] = edit->detail.empty() ? edit->unchanged : edit->detail;
  return ok(v);
}

ApiResponse AdminService::revoke_volume(const AdminIdentity&, Request& r, const std::string& id) {
  VolumeRecord record;
  if (auto failed = load_volume(id, &record)) return *failed;
  if (record.state == VolumeState::kRevoked) {
    return error_response(409, admin_error::kConflict, str_cat("volume ", id, " was already revoked"));
  }
  // The revocation and its record: one transaction.
  const AuditEvent e = admin_event(r, "revoke", "ok", id, "");
  Status s = store_.revoke_volume(id, record.state, clock_.now_unix(), e);
  if (s.kind() == ErrorKind::kConflict) return error_response(409, admin_error::kConflict, s.message());
  log_admin_event(e, s);
  if (!s.is_ok()) return error_response(500, api::kErrInternal, "volume could not be revoked");
  Json::Value v(Json::objectValue);
  v["id"] = id;
  v["state"] = "revoked";
  return ok(v);
}

ApiResponse AdminService::create_token(const AdminIdentity& who, Request& r) {
  auto ttl = r.json.isMember("ttl") ? json_int(r.json, "ttl", 1, kMaxTokenTtl) : Result<int64_t>(3600);
  auto uses = r.json.isMember("uses") ? json_int(r.json, "uses", 1, kMaxTokenUses) : Result<int64_t>(1);
  for (const Status* s : {&ttl.status(), &uses.status()}) {
    if (!s->is_ok()) return error_response(400, api::kErrBadRequest, s->message());
  }
  Json::Value tmpl_json = r.json;
  tmpl_json.removeMember("ttl");
  tmpl_json.removeMember("uses");
  if (tmpl_json.isMember("issued_by")) {
    return error_response(400, api::kErrBadRequest, "'issued_by' is the certificate's name, not a field");
  }
  if (tmpl_json.isMember("rotates")) {
    return error_response(400, api::kErrBadRequest,
                          "a rotation token comes from volumes/ID/rotate, not a field");
  }
  tmpl_json["issued_by"] = who.name;
  auto tmpl = EnrollmentTemplate::from_json(tmpl_json);
  if (!tmpl.is_ok()) return error_response(400, api::kErrBadRequest, tmpl.status().message());
  if (!tmpl->named_policy.empty()) {
    auto set = policies_ != nullptr ? policies_->current() : nullptr;
    if (set == nullptr || set->policies.count(tmpl->named_policy) == 0) {
      return error_response(400, api::kErrBadRequest,
                            str_cat("policy '", tmpl->named_policy, "' is not in the policy file in effect"));
    }
  }
  const int64_t now = clock_.now_unix();
  const AuditEvent e = admin_event(r, "token.create", "ok", "", to_json(tmpl->to_json()));
  auto token = create_enrollment_token(store_, tmpl.value(), now, ttl.value(), static_cast<int>(uses.value()), e);
  log_admin_event(e, token.status());
  if (!token.is_ok()) {
    return error_response(503, api::kErrAuditUnavailable, "the token could not be stored with its record; none was issued");
  }
  Json::Value v(Json::objectValue);
  v["token"] = token.value();
  v["expires_at"] = static_cast<Json::Int64>(now + ttl.value());
  v["uses"] = static_cast<Json::Int64>(uses.value());
  return ok(v);
}

ApiResponse AdminService::rotate_volume(const AdminIdentity& who, Request& r,
                                        const std::string& id) {
  auto ttl =
      r.json.isMember("ttl") ? json_int(r.json, "ttl", 1, kMaxTokenTtl) : Result<int64_t>(3600);
  if (!ttl.is_ok()) return error_response(400, api::kErrBadRequest, ttl.status().message());
  for (const auto& key : r.json.getMemberNames()) {
    if (key != "ttl")
      return error_response(400, api::kErrBadRequest,
                            str_cat("unknown field '", printable(key, 64), "'"));
  }
  VolumeRecord record;
  if (auto failed = load_volume(id, &record)) return *failed;
  if (record.state != VolumeState::kActive) {
    return error_response(409, admin_error::kConflict,
                          str_cat("volume ", id, " is ", volume_state_name(record.state),
                                  "; only an active volume is rotated"));
  }
  auto parsed = parse_json_object(record.policy_json);
  auto policy = parsed.is_ok() ? VolumePolicy::from_json(parsed.value())
                               : Result<VolumePolicy>(parsed.status());
  if (!policy.is_ok())
    return error_response(500, api::kErrInternal, "the volume's policy is unreadable");
  // A group's secret opens every instance's copy: replacing it would shut
  // out all the others. Each instance moves to a key of its own instead.
  if (policy->is_image_group()) {
    return error_response(409, admin_error::kConflict,
                          str_cat("volume ", id,
                                  " is an image group's; each instance moves to a key of its own "
                                  "with 'keygate rotate' and an enrollment token"));
  }
  if (policy->tpm && policy->tpm->sealed) {
    return error_response(
        409, admin_error::kConflict,
        str_cat("volume ", id, " is two-factor (TPM-sealed); enroll it again instead"));
  }
  EnrollmentTemplate tmpl;
  tmpl.platform = policy->platform;
  tmpl.require = policy->require;
  tmpl.named_policy = policy->named_policy;
  tmpl.issued_by = who.name;
  tmpl.rotates = id;
  if (Status valid = tmpl.validate(); !valid.is_ok()) {
    return error_response(500, api::kErrInternal,
                          str_cat("the volume's policy makes no token: ", valid.message()));
  }
  const int64_t now = clock_.now_unix();
  const AuditEvent e = admin_event(r, "rotate.request", "ok", id, str_cat("token for the new volume, ", ttl.value(), " s"));
  auto token = create_enrollment_token(store_, tmpl, now, ttl.value(), 1, e);
  log_admin_event(e, token.status());
  if (!token.is_ok()) {
    return error_response(503, api::kErrAuditUnavailable, "the token could not be stored with its record; none was issued");
  }
  Json::Value v(Json::objectValue);
  v["id"] = id;
  v["token"] = token.value();
  v["expires_at"] = static_cast<Json::Int64>(now + ttl.value());
  return ok(v);
}

ApiResponse AdminService::list_certs() {
  return list_of(store_.list_admin_certs(), "certs", &cert_json, "admin certificates");
}

ApiResponse AdminService::issue_cert(const AdminIdentity& who, Request& r) {
  auto name = json_string(r.json, "name", kMaxAdminNameLength * 4);
  auto role_name = json_string(r.json, "role", 16);
  auto key = json_string(r.json, "public_key", kMaxPublicKeyPem);
  auto days = r.json.isMember("days") ? json_int(r.json, "days", 1, kMaxAdminCertDays)
                                      : Result<int64_t>(kDefaultAdminCertDays);
  for (const Status* s : {&name.status(), &role_name.status(), &key.status(), &days.status()}) {
    if (!s->is_ok()) return error_response(400, api::kErrBadRequest, s->message());
  }
  auto role = parse_admin_role(role_name.value());
  if (!role) return error_response(400, api::kErrBadRequest, "role: viewer, approver or admin");
  const int64_t now = clock_.now_unix();
  auto issued = ca_.issue(key.value(), name.value(), *role, static_cast<int>(days.value()), who.name, now);
  if (!issued.is_ok()) return error_response(400, api::kErrBadRequest, issued.status().message());
  const AuditEvent e{now, "admin.cert.issue", "ok", "", r.source,
                     str_cat("by ", r.who, ": ", issued->record.name, " (", issued->record.role, "), serial ",
                             issued->record.serial, ", ", days.value(), " days")};
  Status s = store_.insert_admin_cert(issued->record, e);
  if (!s.is_ok()) {
    log_error(str_cat("admin API: issue certificate: ", s.message()));
    return error_response(503, api::kErrAuditUnavailable, "the certificate could not be recorded; none issued");
  }
  log_info(str_cat("admin.cert.issue ok peer=", r.source, " detail=", printable(e.detail, 1024)));
  Json::Value v = cert_json(issued->record);
  v["certificate"] = issued->cert_pem;
  v["ca"] = ca_.cert_pem();
  return ok(v);
}

ApiResponse AdminService::revoke_cert(const AdminIdentity& who, Request& r, const std::string& serial) {
  if (!is_serial(serial)) return error_response(400, api::kErrBadRequest, "not a certificate serial (lower-case hex)");
  if (serial == who.serial) {
    return refuse(r, "admin.cert.revoke", 403, admin_error::kForbidden, "",
                  "a certificate cannot revoke itself (another admin must)");
  }
  const int64_t now = clock_.now_unix();
  const AuditEvent e{now, "admin.cert.revoke", "ok", "", r.source, str_cat("by ", r.who, ": serial ", serial)};
  Status s = store_.revoke_admin_cert(serial, now, e);
  if (s.kind() == ErrorKind::kNotFound) return error_response(404, api::kErrNotFound, s.message());
  if (s.kind() == ErrorKind::kConflict) return error_response(409, admin_error::kConflict, s.message());
  if (!s.is_ok()) return error_response(503, api::kErrAuditUnavailable, "the revocation could not be recorded");
  log_info(str_cat("admin.cert.revoke ok peer=", r.source, " detail=", printable(e.detail, 1024)));
  Json::Value v(Json::objectValue);
  v["serial"] = serial;
  v["revoked_at"] = static_cast<Json::Int64>(now);
  return ok(v);
}

ApiResponse AdminService::reload_policy(const AdminIdentity& who, Request&) {
  if (!reload_) return error_response(409, admin_error::kConflict, "no policy file is configured (--policy-file)");
  auto loaded = reload_(who.name);
  if (!loaded.is_ok()) return error_response(400, api::kErrBadRequest, loaded.status().message());
  Json::Value v(Json::objectValue);
  v["loaded"] = loaded.value();
  return ok(v);
}

}  // namespace keygate::server
