#include "core/log.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <mutex>
#include <string>

namespace keygate {
namespace {

struct LogState {
  std::mutex mu;
  std::string program = "keygate";
  LogSink sink = LogSink::kStderr;
  LogLevel min_level = LogLevel::kInfo;
  int kmsg_fd = -1;
};

LogState& state() {
  static LogState s;
  return s;
}

// Debug lines carry the time since the program started (its static
// initialisation), so a slow boot shows where its time went.
const auto kStart = std::chrono::steady_clock::now();

const char* level_name(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarning: return "warning";
    case LogLevel::kError: return "error";
  }
  return "info";
}

int kmsg_priority(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return 7;
    case LogLevel::kInfo: return 6;
    case LogLevel::kWarning: return 4;
    case LogLevel::kError: return 3;
  }
  return 6;
}

// Control characters from remote input must not forge log lines.
void append_sanitized(std::string& out, std::string_view text) {
  for (char c : text) {
    unsigned char u = static_cast<unsigned char>(c);
    out.push_back(u < 0x20 || u == 0x7f ? '?' : c);
  }
}

}  // namespace

void log_init(std::string_view program, LogSink sink, LogLevel min_level) {
  LogState& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.program = std::string(program);
  s.sink = sink;
  s.min_level = min_level;
  if (sink == LogSink::kKmsg && s.kmsg_fd < 0) {
    s.kmsg_fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
    if (s.kmsg_fd < 0) s.sink = LogSink::kStderr;
  }
}

void log_message(LogLevel level, std::string_view message) {
  LogState& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (level < s.min_level) return;
  std::string line;
  if (s.sink == LogSink::kKmsg) {
    line = "<" + std::to_string(kmsg_priority(level)) + ">" + s.program + ": ";
    append_sanitized(line, message);
    line.push_back('\n');
    (void)!write(s.kmsg_fd, line.data(), line.size());
    return;
  }
  line = s.program + ": " + level_name(level) + ": ";
  if (level == LogLevel::kDebug) {
    char stamp[32];
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - kStart).count();
    std::snprintf(stamp, sizeof(stamp), "[%8.1f ms] ", ms);
    line += stamp;
  }
  append_sanitized(line, message);
  line.push_back('\n');
  (void)!write(STDERR_FILENO, line.data(), line.size());
}

}  // namespace keygate
