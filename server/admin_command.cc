#include "server/admin_command.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <iostream>
#include <memory>

#include "core/clock.h"
#include "core/encoding.h"
#include "core/file.h"
#include "core/json.h"
#include "core/log.h"
#include "core/protocol.h"
#include "server/admin_api.h"
#include "server/admin_ca.h"
#include "server/state_files.h"
#include "server/store.h"
#include "server/x509_util.h"
#include "unlocker/http_client.h"

namespace keygate::server {
namespace {

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;
constexpr int kExitRefused = 3;
constexpr size_t kMaxAdminFile = 64 * 1024;
constexpr size_t kMaxAdminResponse = 4 << 20;  // a long list of requests or volumes

int fail(const Status& s) {
  log_error(s.message());
  return s.kind() == ErrorKind::kInvalidArgument ? kExitUsage : kExitFailure;
}

int usage(const std::string& what) {
  log_error(str_cat("usage: keygate-server admin ", what));
  return kExitUsage;
}

std::string default_admin_dir() {
  if (const char* dir = std::getenv("KEYGATE_ADMIN_DIR"); dir != nullptr && *dir != '\0') return dir;
  const char* home = std::getenv("HOME");
  return str_cat(home != nullptr && *home != '\0' ? home : ".", "/.keygate-admin");
}

Status make_private_dir(const std::string& dir) {
  if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return Status::error(ErrorKind::kIo, str_cat("create ", dir, ": ", strerror(errno)));
  }
  struct stat st;
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat(dir, " is not a folder"));
  }
  return Status::ok();
}

// A person's folder, whole: the key first (it is what makes the rest
// useful), each file replaced atomically.
Status write_admin_dir(const std::string& dir, const SecretBuffer& key_pem, const std::string& cert_pem,
                       const std::string& server_ca_pem, const std::string& server_url) {
  KEYGATE_RETURN_IF_ERROR(make_private_dir(dir));
  const std::string_view key(reinterpret_cast<const char*>(key_pem.data()), key_pem.size());
  KEYGATE_RETURN_IF_ERROR(write_file_atomically(dir + "/key.pem", key, 0600));
  KEYGATE_RETURN_IF_ERROR(write_file_atomically(dir + "/cert.pem", cert_pem, 0644));
  KEYGATE_RETURN_IF_ERROR(write_file_atomically(dir + "/server-ca.pem", server_ca_pem, 0644));
  if (!server_url.empty()) KEYGATE_RETURN_IF_ERROR(write_file_atomically(dir + "/server", server_url + "\n", 0644));
  return Status::ok();
}

// The admin API, as one person sees it.
class AdminClient {
 public:
  static Result<AdminClient> open(const Args& args) {
    AdminClient c;
    c.dir_ = args.get("admin-dir", default_admin_dir());
    auto ca = read_small_file(c.dir_ + "/server-ca.pem", kMaxAdminFile);
    if (!ca.is_ok()) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat(c.dir_, ": no admin folder here (", ca.status().message(),
                                   "); make one with 'keygate-server admin bootstrap' or 'admin cert issue', "
                                   "or name it with --admin-dir"));
    }
    c.ca_pem_ = std::move(ca).value();
    c.url_ = args.get("server");
    if (c.url_.empty()) {
      auto saved = read_small_file(c.dir_ + "/server", 4096);
      c.url_ = saved.is_ok() ? std::string(saved.value().substr(0, saved.value().find('\n'))) : "https://127.0.0.1:8443";
    }
    if (c.url_.rfind("https://", 0) != 0) {
      return Status::error(ErrorKind::kInvalidArgument, str_cat("--server ", printable(c.url_, 200), ": an https:// URL"));
    }
    while (!c.url_.empty() && c.url_.back() == '/') c.url_.pop_back();
    return c;
  }

  const std::string& ca_pem() const { return ca_pem_; }
  const std::string& url() const { return url_; }

  // GET or POST `path` under /v1/admin/; the answer's JSON, or the error
  // the server gave (kRefused for 401 and 403), printable.
  Result<Json::Value> call(const char* method, const std::string& path, const Json::Value* body = nullptr) {
    unlocker::HttpRequest req;
    req.method = method;
    req.url = str_cat(url_, kAdminPathPrefix, path);
    req.ca_pem = ca_pem_;
    req.client_cert_file = dir_ + "/cert.pem";
    req.client_key_file = dir_ + "/key.pem";
    req.headers = {"Accept: application/json"};
    // Every POST is JSON (the server refuses one that is not: admin_api.h).
    const std::string text = body != nullptr ? to_json(*body) : std::string(method) == "POST" ? "{}" : "";
    if (!text.empty()) {
      req.headers.push_back("Content-Type: application/json");
      req.body = reinterpret_cast<const uint8_t*>(text.data());
      req.body_size = text.size();
    }
    req.connect_timeout_ms = 5000;
    req.total_timeout_ms = 20000;
    req.max_response = kMaxAdminResponse;
    auto res = session_->perform(req);
    if (!res.is_ok()) return res.status();
    auto parsed = parse_json_object(res->body, kMaxAdminResponse);
    if (res->status == 200) {
      if (!parsed.is_ok()) return parsed.status().with_context(str_cat(req.url, ": response"));
      return parsed;
    }
    std::string code = "unknown", message;
    if (parsed.is_ok() && parsed->isMember(api::field::kError) && parsed.value()[api::field::kError].isObject()) {
      const Json::Value& e = parsed.value()[api::field::kError];
      if (e[api::field::kCode].isString()) code = printable(e[api::field::kCode].asString(), 64);
      if (e[api::field::kMessage].isString()) message = printable(e[api::field::kMessage].asString(), 400);
    }
    const std::string what = str_cat("HTTP ", res->status, " ", code, message.empty() ? "" : ": ", message);
    if (res->status == 401 || res->status == 403) return Status::error(ErrorKind::kRefused, what);
    if (res->status == 400) return Status::error(ErrorKind::kInvalidArgument, what);
    if (res->status == 404) return Status::error(ErrorKind::kNotFound, what);
    if (res->status == 409) return Status::error(ErrorKind::kConflict, what);
    return Status::error(ErrorKind::kUnavailable, what);
  }

 private:
  std::string dir_, ca_pem_, url_;
  std::unique_ptr<unlocker::HttpSession> session_ = std::make_unique<unlocker::HttpSession>();
};

int call_failed(const Status& s) {
  log_error(s.message());
  if (s.kind() == ErrorKind::kRefused) return kExitRefused;
  if (s.kind() == ErrorKind::kInvalidArgument) return kExitUsage;
  return kExitFailure;
}

std::string text_of(const Json::Value& v, const char* key) {
  return v[key].isString() ? printable(v[key].asString(), 200) : std::string("-");
}

std::string claims_text(const Json::Value& claims) {
  std::string out;
  for (const auto& k : claims.getMemberNames()) {
    out += str_cat(out.empty() ? "" : " ", printable(k, 64), "=", text_of(claims, k.c_str()));
  }
  return out;
}

// One request, as a person reads it.
void print_request(const Json::Value& r) {
  std::cout << text_of(r, "request_id") << "  " << text_of(r, "state") << "  volume " << text_of(r, "volume_id")
            << "  instance " << text_of(r, "instance") << "  policy " << text_of(r, "policy") << " ("
            << text_of(r, "mode") << ")  " << r["approvals"].asInt() << " of " << r["approvals_needed"].asInt()
            << " approvals";
  if (text_of(r, "state") == "pending") std::cout << "  expires in " << r["expires_in"].asInt64() << " s";
  std::cout << "\n    " << text_of(r, "platform") << " " << claims_text(r["claims"]) << "\n";
  for (const auto& d : r["approved_by"]) {
    std::cout << "    approved by " << text_of(d, "name") << ": " << text_of(d, "reason") << "\n";
  }
  if (r.isMember("denied_by")) {
    std::cout << "    denied by " << text_of(r["denied_by"], "name") << ": " << text_of(r["denied_by"], "reason") << "\n";
  }
  if (!r["issued_by"].asString().empty()) {
    std::cout << "    token issued by " << text_of(r, "issued_by") << " (who may not approve)\n";
  }
  if (!r["policy_by"].asString().empty()) {
    std::cout << "    policy file put in effect by " << text_of(r, "policy_by") << " (who may not approve)\n";
  }
  if (r.isMember("pcr_changes")) {
    const Json::Value& pcrs = r["pcr_changes"]["pcrs"];
    for (const auto& pcr : pcrs.getMemberNames()) {
      std::string accepted;
      for (const auto& v : pcrs[pcr]["accepted"]) accepted += (accepted.empty() ? "" : " or ") + printable(v.asString(), 128);
      std::cout << "    PCR " << printable(pcr, 4) << " (" << text_of(r["pcr_changes"], "bank") << "): accepted "
                << accepted << ", quoted " << text_of(pcrs[pcr], "quoted") << "\n";
    }
  }
}

int print_json_or(const Args& args, const Json::Value& v, const std::function<void()>& human) {
  if (args.has("json")) {
    std::cout << to_pretty_json(v) << "\n";
  } else {
    human();
  }
  return 0;
}

// A new key pair; the key's PEM (secret memory) and the public key's.
Result<std::pair<SecretBuffer, std::string>> new_key_pair() {
  OwnedPkey key = generate_p256();
  if (!key) return Status::error(ErrorKind::kInternal, "EC key generation");
  auto pem = pem_of_key(key.get());
  if (!pem.is_ok()) return pem.status();
  return std::make_pair(std::move(pem).value(), public_pem_of_key(key.get()));
}

int cmd_bootstrap(const Args& args, const Settings& s) {
  const std::string name = args.get("name");
  if (name.empty()) return usage("bootstrap --name NAME [--out DIR] [--server-url URL] [--days N]");
  if (!is_admin_name(name)) {
    return fail(Status::error(ErrorKind::kInvalidArgument,
                              str_cat("--name '", printable(name, 80), "': 1 to ", kMaxAdminNameLength,
                                      " letters, digits, '.', '_', '@' or '-'")));
  }
  auto days = args.get_int("days", kDefaultAdminCertDays, 1, kMaxAdminCertDays);
  if (!days.is_ok()) return fail(days.status());
  auto store = open_store(s);
  if (!store.is_ok()) return fail(store.status());
  SystemClock clock;
  const int64_t now = clock.now_unix();
  auto certs = store.value()->list_admin_certs();
  if (!certs.is_ok()) return fail(certs.status());
  for (const auto& c : certs.value()) {
    if (c.revoked_at == 0 && c.expires_at >= now && c.role == "admin") {
      return fail(Status::error(ErrorKind::kInvalidArgument,
                                str_cat("an admin certificate is in force already (", c.name, ", serial ", c.serial,
                                        "): bootstrap makes only the first; issue more with "
                                        "'keygate-server admin cert issue'")));
    }
  }
  std::vector<std::string> sans = {"DNS:localhost", "IP:127.0.0.1"};
  for (const auto& san : s.tls_san) sans.push_back(san);
  Status tls = ensure_tls_material(s.state_dir, sans);
  if (!tls.is_ok()) return fail(tls);
  auto server_ca = read_small_file(s.state_dir + "/ca.pem", kMaxAdminFile);
  if (!server_ca.is_ok()) return fail(server_ca.status());
  auto ca = AdminCa::load_or_create(s.state_dir);
  if (!ca.is_ok()) return fail(ca.status());
  auto keys = new_key_pair();
  if (!keys.is_ok()) return fail(keys.status());
  auto issued = ca->issue(keys->second, name, AdminRole::kAdmin, static_cast<int>(days.value()), "bootstrap", now);
  if (!issued.is_ok()) return fail(issued.status());
  const std::string out = args.get("out", default_admin_dir());
  const std::string url = args.get("server-url", "https://" + s.listen);
  // The folder first, then the record: a certificate recorded whose key
  // was never written would block the next bootstrap for nothing.
  Status written = write_admin_dir(out, keys->first, issued->cert_pem, server_ca.value(), url);
  if (!written.is_ok()) return fail(written);
  const AuditEvent event{now, "admin.cert.issue", "ok", "", "local",
                         str_cat("by bootstrap: ", name, " (admin), serial ", issued->record.serial, ", ",
                                 days.value(), " days")};
  Status recorded = store.value()->insert_admin_cert(issued->record, event);
  if (!recorded.is_ok()) return fail(recorded.with_context("record the admin certificate"));
  std::cout << "admin certificate for " << name << " (admin), serial " << issued->record.serial << ", in " << out
            << "\n";
  return 0;
}

int cmd_cert_issue(const Args& args, AdminClient& client) {
  const std::string name = args.get("name"), role = args.get("role"), out = args.get("out");
  if (name.empty() || role.empty() || out.empty()) {
    return usage("cert issue --name NAME --role viewer|approver|admin --out DIR [--days N]");
  }
  auto days = args.get_int("days", kDefaultAdminCertDays, 1, kMaxAdminCertDays);
  if (!days.is_ok()) return fail(days.status());
  auto keys = new_key_pair();
  if (!keys.is_ok()) return fail(keys.status());
  Json::Value body(Json::objectValue);
  body["name"] = name;
  body["role"] = role;
  body["public_key"] = keys->second;
  body["days"] = static_cast<Json::Int64>(days.value());
  auto res = client.call("POST", "certs", &body);
  if (!res.is_ok()) return call_failed(res.status());
  Status written = write_admin_dir(out, keys->first, res.value()["certificate"].asString(), client.ca_pem(), client.url());
  if (!written.is_ok()) return fail(written);
  std::cout << "admin certificate for " << text_of(res.value(), "name") << " (" << text_of(res.value(), "role")
            << "), serial " << text_of(res.value(), "serial") << ", in " << out << "\n";
  return 0;
}

int cmd_decide(const Args& args, AdminClient& client, const std::vector<std::string>& pos, bool approve) {
  const char* verb = approve ? "approve" : "deny";
  if (pos.size() != 3 || !args.has("reason")) return usage(str_cat(verb, " REQUEST_ID --reason TEXT"));
  Json::Value body(Json::objectValue);
  body["reason"] = args.get("reason");
  auto res = client.call("POST", str_cat("requests/", pos[2], "/", verb), &body);
  if (!res.is_ok()) return call_failed(res.status());
  return print_json_or(args, res.value(), [&] {
    const Json::Value& r = res.value();
    std::cout << text_of(r, "request_id") << ": " << text_of(r, "state") << " (" << r["approvals"].asInt() << " of "
              << r["approvals_needed"].asInt() << " approvals)\n";
  });
}

}  // namespace

int admin_command(const Args& args, const Settings& settings, const Result<EnrollmentTemplate>& tmpl) {
  const auto& pos = args.positional();
  const std::string sub = pos.size() > 1 ? pos[1] : "";
  const std::string third = pos.size() > 2 ? pos[2] : "";
  if (sub == "bootstrap" && pos.size() == 2) return cmd_bootstrap(args, settings);
  auto client = AdminClient::open(args);
  if (!client.is_ok()) return fail(client.status());
  AdminClient& c = client.value();
  if (sub == "whoami" && pos.size() == 2) {
    auto res = c.call("GET", "whoami");
    if (!res.is_ok()) return call_failed(res.status());
    return print_json_or(args, res.value(), [&] {
      std::cout << text_of(res.value(), "name") << " (" << text_of(res.value(), "role") << "), serial "
                << text_of(res.value(), "serial") << ", at " << c.url() << "\n";
    });
  }
  if (sub == "requests" && pos.size() == 2) {
    auto res = c.call("GET", args.has("all") ? "requests?all=1" : "requests");
    if (!res.is_ok()) return call_failed(res.status());
    return print_json_or(args, res.value(), [&] {
      if (res.value()["requests"].empty()) std::cout << (args.has("all") ? "no requests\n" : "no pending requests\n");
      for (const auto& r : res.value()["requests"]) print_request(r);
    });
  }
  if (sub == "request" && pos.size() == 3) {
    auto res = c.call("GET", "requests/" + third);
    if (!res.is_ok()) return call_failed(res.status());
    return print_json_or(args, res.value(), [&] { print_request(res.value()); });
  }
  if (sub == "approve" || sub == "deny") return cmd_decide(args, c, pos, sub == "approve");
  if (sub == "volumes" && pos.size() == 2) {
    auto res = c.call("GET", "volumes");
    if (!res.is_ok()) return call_failed(res.status());
    return print_json_or(args, res.value(), [&] {
      for (const auto& v : res.value()["volumes"]) {
        std::cout << text_of(v, "id") << "  " << text_of(v, "state") << "  " << v["policy"]["platform"].asString()
                  << " " << claims_text(v["policy"]["require"])
                  << (v["policy"].isMember("named_policy") ? "  policy " + text_of(v["policy"], "named_policy") : "")
                  << "\n";
      }
    });
  }
  if (sub == "instances" && pos.size() == 2) {
    auto res = c.call("GET", "instances");
    if (!res.is_ok()) return call_failed(res.status());
    return print_json_or(args, res.value(), [&] {
      for (const auto& i : res.value()["instances"]) {
        std::cout << text_of(i, "instance") << "  " << text_of(i, "platform") << "  " << text_of(i, "relation")
                  << "  volume " << text_of(i, "volume_id") << " (" << text_of(i, "volume_state") << ")\n";
      }
    });
  }
  if (sub == "volume" && pos.size() == 3) {
    auto res = c.call("GET", "volumes/" + third);
    if (!res.is_ok()) return call_failed(res.status());
    std::cout << to_pretty_json(res.value()) << "\n";
    return 0;
  }
  if (sub == "revoke" && pos.size() == 3 && args.has("instance")) {
    Json::Value body(Json::objectValue);
    body["instance"] = args.get("instance");
    auto res = c.call("POST", str_cat("volumes/", third, "/revoke-instance"), &body);
    if (!res.is_ok()) return call_failed(res.status());
    std::cout << "volume " << third << ": " << text_of(res.value(), "result") << "\n";
    return 0;
  }
  if (sub == "revoke" && pos.size() == 3) {
    auto res = c.call("POST", str_cat("volumes/", third, "/revoke"));
    if (!res.is_ok()) return call_failed(res.status());
    std::cout << "volume " << third << " revoked\n";
    return 0;
  }
  if (sub == "rotate" && pos.size() == 3) {
    auto ttl = args.get_int("ttl", 3600, 1, 30 * 86400);
    if (!ttl.is_ok()) return fail(ttl.status());
    Json::Value body(Json::objectValue);
    body["ttl"] = static_cast<Json::Int64>(ttl.value());
    auto res = c.call("POST", str_cat("volumes/", third, "/rotate"), &body);
    if (!res.is_ok()) return call_failed(res.status());
    // The token alone on stdout, as 'token create' prints one; what to do
    // with it on stderr.
    std::cout << res.value()["token"].asString() << "\n";
    log_info(
        str_cat("volume ", third,
                ": on its instance, 'keygate rotate DEVICE --enrollment-token-file FILE' "
                "with this token moves it to a new secret; confirming that revokes this volume"));
    return 0;
  }
  if (sub == "token" && third == "create" && pos.size() == 3) {
    if (!tmpl.is_ok()) return fail(tmpl.status());
    Json::Value body = tmpl.value().to_json();
    auto ttl = args.get_int("ttl", 3600, 1, 30 * 86400);
    auto uses = args.get_int("uses", 1, 1, 100000);
    if (!ttl.is_ok()) return fail(ttl.status());
    if (!uses.is_ok()) return fail(uses.status());
    body["ttl"] = static_cast<Json::Int64>(ttl.value());
    body["uses"] = static_cast<Json::Int64>(uses.value());
    auto res = c.call("POST", "tokens", &body);
    if (!res.is_ok()) return call_failed(res.status());
    std::cout << res.value()["token"].asString() << "\n";
    return 0;
  }
  if (sub == "certs" && pos.size() == 2) {
    auto res = c.call("GET", "certs");
    if (!res.is_ok()) return call_failed(res.status());
    return print_json_or(args, res.value(), [&] {
      for (const auto& x : res.value()["certs"]) {
        std::cout << text_of(x, "serial") << "  " << text_of(x, "name") << "  " << text_of(x, "role")
                  << "  issued by " << text_of(x, "issued_by")
                  << (x["revoked_at"].asInt64() != 0 ? "  REVOKED" : "") << "\n";
      }
    });
  }
  if (sub == "cert" && third == "issue" && pos.size() == 3) return cmd_cert_issue(args, c);
  if (sub == "cert" && third == "revoke" && pos.size() == 4) {
    auto res = c.call("POST", str_cat("certs/", pos[3], "/revoke"));
    if (!res.is_ok()) return call_failed(res.status());
    std::cout << "admin certificate " << pos[3] << " revoked\n";
    return 0;
  }
  if (sub == "policy" && third == "reload" && pos.size() == 3) {
    auto res = c.call("POST", "policy/reload");
    if (!res.is_ok()) return call_failed(res.status());
    std::cout << "policy loaded: " << text_of(res.value(), "loaded") << "\n";
    return 0;
  }
  return usage(
      "bootstrap | whoami | requests [--all] | request ID | approve ID --reason R | deny ID "
      "--reason R | "
      "volumes | volume ID | instances | revoke VOLUME_ID [--instance ID] | rotate VOLUME_ID "
      "[--ttl S] | token create ... | certs | cert issue ... | cert revoke SERIAL | "
      "policy reload");
}

}  // namespace keygate::server
