#include "server/refusal.h"

#include "core/protocol.h"

namespace keygate::server {

ApiResponse error_response(int status, const char* code, std::string message) {
  ApiResponse r;
  r.status = status;
  r.body[api::field::kError][api::field::kCode] = code;
  r.body[api::field::kError][api::field::kMessage] = std::move(message);
  return r;
}

Refusal bad_request(std::string detail) {
  Refusal r;
  r.http_status = 400;
  r.code = api::kErrBadRequest;
  r.client_message = detail;
  r.audit_detail = std::move(detail);
  return r;
}

Refusal refused(const char* code, std::string client_message, std::string detail) {
  Refusal r;
  r.http_status = 403;
  r.code = code;
  r.client_message = std::move(client_message);
  r.audit_detail = std::move(detail);
  return r;
}

Refusal server_error(std::string client_message, std::string detail) {
  Refusal r;
  r.http_status = 500;
  r.code = api::kErrInternal;
  r.client_message = std::move(client_message);
  r.audit_detail = std::move(detail);
  r.server_fault = true;
  return r;
}

Refusal store_error(std::string client_message, const Status& cause) {
  if (cause.kind() != ErrorKind::kUnavailable)
    return server_error(std::move(client_message), cause.message());
  Refusal r = server_error("the key store is unavailable; retry", cause.message());
  r.http_status = 503;
  r.code = api::kErrBusy;
  r.retry_after_seconds = 2;
  return r;
}

Refusal refusal_for(const Status& status, const char* code, std::string client_message) {
  switch (status.kind()) {
    case ErrorKind::kInvalidArgument: return bad_request(status.message());
    case ErrorKind::kUnavailable: {
      Refusal r = server_error("the server is busy; retry", status.message());
      r.http_status = 503;
      r.code = api::kErrBusy;
      r.retry_after_seconds = 2;
      return r;
    }
    case ErrorKind::kIo:
    case ErrorKind::kInternal:
    case ErrorKind::kOk: return server_error("internal error", status.message());
    case ErrorKind::kRefused:
    case ErrorKind::kIntegrity:
    case ErrorKind::kUntrusted:
    case ErrorKind::kNotFound:
    case ErrorKind::kConflict: break;
  }
  return refused(code, std::move(client_message), status.message());
}

}  // namespace keygate::server
