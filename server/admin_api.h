// The admin API, under /v1/admin/ on the key server's own HTTPS port, for
// people with a certificate of the admin CA (server/admin_ca.h). What each
// role may do:
//   viewer    GET whoami, requests, requests/ID, volumes, volumes/ID, instances
//             (each volume's bound instance, and an image group's known and
//             revoked ones), certs, audit (the trail, filtered, and whether
//             its chain verifies); the console's pages (/console/) and the
//             metrics (/metrics), outside /v1/admin/
//   approver  POST requests/ID/approve, requests/ID/deny ({"reason": ...})
//   admin     POST tokens, certs, certs/SERIAL/revoke, volumes/ID/revoke,
//             volumes/ID/revoke-instance ({"instance": ...}), policy/reload
// Every change, and every refused attempt at one, is on the audit trail
// with the person's name. The `keygate-server admin` commands and the web
// console are its clients.
//
// A browser sends its client certificate to any page that asks, so a POST
// must show it came from a page of this server, not a form or script of
// another site (CSRF): its Content-Type is application/json (which a page
// of another origin can only send after a CORS preflight, never answered
// here), its Origin, if any, is this server's, and its Sec-Fetch-Site, if
// any, says same-origin.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "core/clock.h"
#include "server/admin_ca.h"
#include "server/approvals.h"
#include "server/operations.h"
#include "server/policy_file.h"
#include "server/refusal.h"
#include "server/store.h"

namespace keygate::server {

constexpr char kAdminPathPrefix[] = "/v1/admin/";

// Error codes of the admin API (besides bad_request, not_found, internal).
namespace admin_error {
constexpr char kUnauthenticated[] = "unauthenticated";  // 401: no admin certificate
constexpr char kForbidden[] = "forbidden";              // 403: not this role's, or not this person's
constexpr char kConflict[] = "conflict";                // 409: decided, revoked or changed meanwhile
}  // namespace admin_error

// What the HTTPS front passes of a request's headers.
struct AdminRequestHeaders {
  std::string content_type;
  std::string origin;
  std::string sec_fetch_site;
  std::string host;
};

// A file of the console (server/console/), as built into the server.
struct ConsoleAsset {
  const char* path;  // under /console/: "index.html", "console.js", ...
  const char* content_type;  // without its charset (UTF-8)
  std::string_view body;
};
// The console's files (console_assets.cc, made at build time).
extern const ConsoleAsset kConsoleAssets[];
extern const size_t kConsoleAssetCount;

constexpr char kConsolePathPrefix[] = "/console/";
constexpr char kMetricsPath[] = "/metrics";

// A volume as the admin API and `volumes list --json` show it (no secret).
Json::Value volume_json(const VolumeRecord& volume);

class AdminService {
 public:
  // Reloads the policy file in effect (the same as SIGHUP) for `who`;
  // null: no policy file is configured.
  using PolicyReload = std::function<Result<std::string>(const std::string& who)>;

  AdminService(Store& store, const Clock& clock, const AdminCa& ca, const PolicyRegistry* policies,
               PolicyReload reload, Operations* operations = nullptr);

  // One request from `source` (an address) whose TLS client certificate
  // verified against the admin CA and said `peer`; `peer` null: no
  // certificate (401).
  ApiResponse handle(const AdminPeer* peer, std::string_view method, std::string_view target,
                     std::string_view body, const std::string& source,
                     const AdminRequestHeaders& headers = AdminRequestHeaders());
  // GET /console/...: a page of the console, for any role.
  ApiResponse console(const AdminPeer* peer, std::string_view target, const std::string& source);
  // GET /metrics, for any role: the Prometheus text format.
  ApiResponse metrics(const AdminPeer* peer, const std::string& source, int open_connections);

 private:
  struct Request;
  ApiResponse route(const AdminIdentity& who, Request& request);
  ApiResponse list_requests(Request& request);
  ApiResponse show_request(const std::string& id);
  // Request `id` into *out; or the answer why not (malformed, unknown, unreadable).
  std::optional<ApiResponse> load_request(const std::string& id, Approval* out);
  ApiResponse decide(const AdminIdentity& who, Request& request, const std::string& id, bool approve);
  ApiResponse list_volumes();
  ApiResponse show_volume(const std::string& id);
  ApiResponse list_instances();
  std::optional<ApiResponse> load_volume(const std::string& id, VolumeRecord* out);
  ApiResponse revoke_volume(const AdminIdentity& who, Request& request, const std::string& id);
  ApiResponse revoke_instance(Request& request, const std::string& id);
  ApiResponse create_token(const AdminIdentity& who, Request& request);
  // An active volume bound to one instance: a one-use token with which that
  // instance's `keygate rotate` enrolls its new key; confirming the new
  // volume revokes this one (KeyService).
  ApiResponse rotate_volume(const AdminIdentity& who, Request& request, const std::string& id);
  ApiResponse list_certs();
  ApiResponse list_audit(Request& request);
  // The person `peer` names into *who, if the certificate is recorded and in
  // force (request.who then names them); else the answer (401, audited, or
  // 500 if the store failed).
  std::optional<ApiResponse> sign_in(const AdminPeer* peer, Request& request, AdminIdentity* who);
  ApiResponse issue_cert(const AdminIdentity& who, Request& request);
  ApiResponse revoke_cert(const AdminIdentity& who, Request& request, const std::string& serial);
  ApiResponse reload_policy(const AdminIdentity& who, Request& request);
  // The trail's record of an admin action by the request's person, and its
  // log line (with whether it was written).
  AuditEvent admin_event(const Request& request, const char* event, const char* outcome,
                         const std::string& volume_id, const std::string& detail);
  void log_admin_event(const AuditEvent& event, const Status& written);
  // Audits an admin action (or a refused one) and says whether it was written.
  Status audit(const Request& request, const char* event, const char* outcome, const std::string& volume_id,
               const std::string& detail);
  // A refused attempt: audited, then answered `status` with `code`.
  ApiResponse refuse(const Request& request, const char* event, int status, const char* code,
                     const std::string& volume_id, const std::string& why);

  Store& store_;
  const Clock& clock_;
  const AdminCa& ca_;
  const PolicyRegistry* policies_;
  PolicyReload reload_;
  Operations* operations_;
};

}  // namespace keygate::server
