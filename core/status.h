// Errors as values. A Status is cheap when OK and carries a classified,
// human-readable message when not. Result<T> is a value or a Status.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace keygate {

// How a caller should react to a failure.
enum class ErrorKind {
  kOk = 0,
  kInvalidArgument,  // bad input or configuration: do not retry
  kUnavailable,      // network, timeout, 5xx, 429: retry or try another server
  kRefused,          // refused by policy (403): do not hammer
  kUntrusted,        // peer identity could not be verified (TLS, pinned CA)
  kIntegrity,        // a signature, MAC or envelope did not verify
  kNotFound,
  kConflict,  // state does not allow the operation (already enrolled, revoked, ...)
  kIo,
  kInternal,
};

const char* error_kind_name(ErrorKind kind);

class [[nodiscard]] Status {
 public:
  Status() = default;
  static Status ok() { return Status(); }
  static Status error(ErrorKind kind, std::string message) {
    return Status(kind, std::move(message));
  }

  bool is_ok() const { return kind_ == ErrorKind::kOk; }
  ErrorKind kind() const { return kind_; }
  const std::string& message() const { return message_; }

  // Returns a copy whose message is "context: message", same kind.
  Status with_context(std::string_view context) const;

 private:
  Status(ErrorKind kind, std::string message) : kind_(kind), message_(std::move(message)) {}
  ErrorKind kind_ = ErrorKind::kOk;
  std::string message_;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {  // NOLINT: implicit by design
    if (status_.is_ok()) status_ = Status::error(ErrorKind::kInternal, "Result built from OK status");
  }

  bool is_ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  T& operator*() & { return *value_; }

 private:
  std::optional<T> value_;
  Status status_;
};

// Concatenates string-like pieces and integers.
template <typename... Args>
std::string str_cat(const Args&... args) {
  auto to_piece = [](const auto& a) -> std::string {
    using A = std::decay_t<decltype(a)>;
    if constexpr (std::is_arithmetic_v<A> && !std::is_same_v<A, char>) {
      return std::to_string(a);
    } else if constexpr (std::is_same_v<A, char>) {
      return std::string(1, a);
    } else {
      return std::string(std::string_view(a));
    }
  };
  std::string out;
  (out.append(to_piece(args)), ...);
  return out;
}

}  // namespace keygate

#define KEYGATE_RETURN_IF_ERROR(expr)          \
  do {                                          \
    ::keygate::Status kg_status_ = (expr);      \
    if (!kg_status_.is_ok()) return kg_status_; \
  } while (0)
