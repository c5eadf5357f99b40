// HTTPS front of the key server: asynchronous (Boost.Beast on Asio), so an
// idle or slow connection holds no thread. Each connection has a deadline
// for its whole TLS handshake and for each whole request (headers and body,
// not per byte); bodies are bounded while they are read, whatever their
// transfer encoding; connections are capped in total and per source address
// (beyond the cap a new one is closed at once); the key service runs on a
// bounded pool of workers apart from the I/O threads, and the admin API on a
// small pool of its own.
#pragma once

#include <functional>
#include <string>

#include "core/status.h"
#include "server/admin_api.h"
#include "server/key_service.h"

namespace keygate::server {

struct HttpOptions {
  std::string host = "127.0.0.1";
  int port = 8443;        // 0: any free port
  std::string port_file;  // if set, the bound port is written here
  std::string cert_file;
  std::string key_file;
  // The admin CA (server/admin_ca.h): client certificates are asked for and
  // verified against it; empty: none asked for.
  std::string admin_ca_file;

  int backlog = 4096;                    // the kernel caps it at net.core.somaxconn
  long handshake_timeout_ms = 5000;      // TCP accept to the end of the TLS handshake
  long request_timeout_ms = 10000;       // a whole request, and the wait for it on a kept-alive connection
  long write_timeout_ms = 5000;          // a whole response
  int max_connections = 8192;            // open at once, in total
  int max_connections_per_source = 128;  // open at once from one address
  int max_requests_per_connection = 100;
  int io_threads = 0;  // 0: one per core (TLS handshakes run here)
  int workers = 0;     // 0: four per core (verification, and the store's fsync)
  // The admin API, the console and /metrics run on workers of their own, so
  // that no admin request (a long audit trail read, a wait on the database)
  // holds a worker an unlock needs.
  int admin_workers = 2;
  // Run on a worker at each SIGHUP (the policy file's reload), if set.
  std::function<void()> on_reload;
};

// Serves until SIGTERM or SIGINT; SIGHUP runs on_reload. Requests under
// /v1/admin/ go to `admin` (null: 404). Returns an error if it cannot bind
// or load the TLS material.
Status serve_https(KeyService& service, AdminService* admin, const HttpOptions& options);

}  // namespace keygate::server
