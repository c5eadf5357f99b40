#include "core/status.h"

namespace keygate {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kOk: return "ok";
    case ErrorKind::kInvalidArgument: return "invalid_argument";
    case ErrorKind::kUnavailable: return "unavailable";
    case ErrorKind::kRefused: return "refused";
    case ErrorKind::kUntrusted: return "untrusted";
    case ErrorKind::kIntegrity: return "integrity";
    case ErrorKind::kNotFound: return "not_found";
    case ErrorKind::kConflict: return "conflict";
    case ErrorKind::kIo: return "io";
    case ErrorKind::kInternal: return "internal";
  }
  return "unknown";
}

Status Status::with_context(std::string_view context) const {
  if (is_ok()) return *this;
  return Status(kind_, str_cat(context, ": ", message_));
}

}  // namespace keygate
