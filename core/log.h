// Logging for programs (libraries return errors; only programs log, once).
// Messages are plain strings: SecretBuffer has no string conversion, so a
// secret cannot be formatted into a log line without an explicit copy.
#pragma once

#include <string_view>

namespace keygate {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

enum class LogSink {
  kStderr,  // "keygate: level: message"
  kKmsg,    // /dev/kmsg with syslog priority, for the initramfs console
};

// Sets process-wide logging. `program` prefixes each line.
void log_init(std::string_view program, LogSink sink, LogLevel min_level);

void log_message(LogLevel level, std::string_view message);
inline void log_debug(std::string_view m) { log_message(LogLevel::kDebug, m); }
inline void log_info(std::string_view m) { log_message(LogLevel::kInfo, m); }
inline void log_warning(std::string_view m) { log_message(LogLevel::kWarning, m); }
inline void log_error(std::string_view m) { log_message(LogLevel::kError, m); }

}  // namespace keygate
