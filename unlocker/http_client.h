// HTTP(S) transport on libcurl. For the key server: HTTPS only, TLS 1.2+,
// the pinned CA as the only trust anchor, hostname verified, no proxies, no
// redirects, bounded response size. For the metadata service: plain HTTP to
// the configured link-local endpoint.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "core/secret.h"
#include "core/status.h"

namespace keygate::unlocker {

struct HttpResponse {
  long status = 0;
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;
};

// One header line of an answer ("Name: value\r\n") appended to `headers`
// as {name, value without surrounding blanks}; lines without a colon (the
// status line, the blank end) are skipped, and so is every line after the
// first kMaxResponseHeaders.
constexpr size_t kMaxResponseHeaders = 64;
void add_header_line(std::string_view line, std::vector<std::pair<std::string, std::string>>* headers);

struct HttpRequest {
  std::string method = "GET";
  std::string url;
  std::vector<std::string> headers;  // "Name: value"
  const uint8_t* body = nullptr;     // not copied; may point into a SecretBuffer
  size_t body_size = 0;
  std::string ca_pem;  // HTTPS: the only trusted CA (required for https URLs)
  // HTTPS: a client certificate and its key (PEM files), if set.
  std::string client_cert_file;
  std::string client_key_file;
  long connect_timeout_ms = 2000;
  long total_timeout_ms = 10000;
  size_t max_response = 64 * 1024;
};

// A connection-reusing client: requests to the same host share one TCP and
// TLS connection (a challenge and its unlock cost one handshake).
class HttpSession {
 public:
  HttpSession();
  ~HttpSession();
  HttpSession(const HttpSession&) = delete;
  HttpSession& operator=(const HttpSession&) = delete;

  // Performs one request. Transport failures: kUnavailable (connect, timeout,
  // reset), kUntrusted (certificate not from the pinned CA, name mismatch).
  // Any HTTP status is returned as a response, not an error.
  Result<HttpResponse> perform(const HttpRequest& request);

 private:
  void* curl_;  // CURL*
};

// Sets up the process-wide TLS state the first HTTPS connection would
// otherwise build on the unlock's critical path (libcurl and OpenSSL
// initialisation, OpenSSL's random generator, the TLS client method tables).
// Idempotent and thread-safe; run it on a thread while the LUKS header is
// read. Touches no key material.
void prepare_https();


}  // namespace keygate::unlocker
