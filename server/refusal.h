// A request the key server does not serve, as a value: the HTTP status, the
// short code and message the client gets (core/protocol.h's codes), and the
// detail the audit trail and the log get (never a secret; may name the
// claim or check that failed, which the client is not told). Every refusal
// of KeyService is answered through KeyService::answer, which audits it.
#pragma once

#include <json/value.h>

#include <optional>
#include <string>
#include <utility>

#include "core/status.h"

namespace keygate::server {

struct ApiResponse {
  int status = 200;
  Json::Value body;
  int retry_after_seconds = 0;  // > 0: sent as Retry-After
  // Set for an answer that is not JSON (a console page, the metrics):
  // `text` is sent as it is, with this Content-Type, instead of `body`.
  std::string content_type;
  std::string text;
  std::string location;  // a redirect's Location
};

// {"error": {"code": code, "message": message}}
ApiResponse error_response(int status, const char* code, std::string message);

struct Refusal {
  int http_status = 403;
  const char* code = "";
  std::string client_message;
  std::string audit_detail;
  // The server failed (a store or the KEK), rather than the request: audited
  // with outcome "error".
  bool server_fault = false;
  // Already on the log and not to be audited again (the audit trail itself
  // could not be written).
  bool audited = false;

  int retry_after_seconds = 0;

  ApiResponse response() const {
    ApiResponse r = error_response(http_status, code, client_message);
    r.retry_after_seconds = retry_after_seconds;
    return r;
  }
};

// 400: the request is malformed; the client is told what (`detail`, which
// names the field).
Refusal bad_request(std::string detail);
// 403 with `code`: the client gets `client_message`, the trail `detail`.
Refusal refused(const char* code, std::string client_message, std::string detail);
// 500 internal: the client gets `client_message`, the trail the cause.
Refusal server_error(std::string client_message, std::string detail);
// A store call that failed: 503 with Retry-After when the store is only
// unavailable (its database down or unreachable: the client retries),
// otherwise server_error.
Refusal store_error(std::string client_message, const Status& cause);

// The one ErrorKind-to-HTTP mapping, for a failed step whose Status kind
// says who is at fault:
//   kInvalidArgument                  400 bad_request, the message to the client
//   kRefused, kIntegrity, kUntrusted,
//   kNotFound, kConflict              403 `code` with `client_message`
//   kUnavailable                      503 busy
//   kIo, kInternal                    500 internal
Refusal refusal_for(const Status& status, const char* code, std::string client_message);

// A step's value, or why the request is refused.
template <typename T>
class [[nodiscard]] Checked {
 public:
  Checked(T value) : value_(std::move(value)) {}               // NOLINT: implicit by design
  Checked(Refusal refusal) : refusal_(std::move(refusal)) {}  // NOLINT: implicit by design

  bool ok() const { return value_.has_value(); }
  T& value() { return *value_; }
  T* operator->() { return &*value_; }
  Refusal& refusal() { return *refusal_; }

 private:
  std::optional<T> value_;
  std::optional<Refusal> refusal_;
};

}  // namespace keygate::server
