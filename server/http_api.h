// HTTPS front of the key server (cpp-httplib over OpenSSL, TLS 1.2+).
#pragma once

#include <string>

#include "core/status.h"
#include "server/key_service.h"

namespace keygate::server {

struct HttpOptions {
  std::string host = "127.0.0.1";
  int port = 8443;                // 0: any free port
  std::string port_file;          // if set, the bound port is written here
  std::string cert_file;
  std::string key_file;
};

// Serves until SIGTERM or SIGINT. Returns an error if it cannot bind or load
// the TLS material.
Status serve_https(KeyService& service, const HttpOptions& options);

}  // namespace keygate::server
