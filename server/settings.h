// keygate-server's settings: the configuration file's keys (README
// "Configuration"), validated whole before anything is started. Options on
// the command line are applied over them by the caller.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "server/http_api.h"
#include "server/key_service.h"
#include "server/policy.h"
#include "server/rate_limit.h"
#include "server/store.h"
#include "server/webhook.h"

namespace keygate::server {

constexpr size_t kMaxSettingsFile = 256 * 1024;

struct Settings {
  std::string state_dir = "/var/lib/keygate";
  std::string listen = "127.0.0.1:8443";
  std::string policy_file;  // named policies (server/policy_file.h); empty: none
  std::vector<std::string> aws_trust_dirs;
  std::vector<std::string> gcp_jwks_files;
  std::vector<std::string> azure_trust_dirs;
  std::vector<std::string> tls_san;
  long nonce_ttl = 60;
  long pending_ttl = ServiceOptions().pending_ttl_seconds;
  long evidence_max_age = 300;
  std::vector<EnrollmentTemplate> attestation_enrollment;
  RateLimit per_source = ServiceOptions().per_source;
  RateLimit per_instance = ServiceOptions().per_instance;
  int max_connections = HttpOptions().max_connections;
  int max_connections_per_source = HttpOptions().max_connections_per_source;
  // A PostgreSQL connection string (README "PostgreSQL"); empty: the
  // embedded SQLite store in state_dir, unless state_dir holds store.conf.
  std::string store;
  int store_connections = 8;  // the PostgreSQL store's pool, per process
  // "webhook": {"url", "ca_file", "secret_file", "refusal_spike"}; url
  // empty: no notifications (README "Notifications").
  WebhookOptions webhook;
};


// The configuration file's text: a JSON object of the keys above, each of
// its type and range, no other key. kInvalidArgument naming the key
// otherwise; the caller adds the file's name.
Result<Settings> parse_settings(std::string_view text);

// The store the settings name: PostgreSQL when `store` or the state
// folder's store.conf holds a connection string, else the embedded SQLite
// store in the state folder (created, mode 0700, if missing).
Result<std::unique_ptr<Store>> open_store(const Settings& s);

}  // namespace keygate::server
