// Time as an interface, so verifiers can be tested against recorded,
// expired evidence with a fixed clock. Production code only ever builds
// SystemClock; there is no flag or setting that swaps it.
#pragma once

#include <cstdint>

namespace keygate {

class Clock {
 public:
  virtual ~Clock() = default;
  // Seconds since the Unix epoch.
  virtual int64_t now_unix() const = 0;
};

class SystemClock final : public Clock {
 public:
  int64_t now_unix() const override;
};

// A clock that always reads the same instant. For tests.
class FixedClock final : public Clock {
 public:
  explicit FixedClock(int64_t unix_seconds) : now_(unix_seconds) {}
  int64_t now_unix() const override { return now_; }
  void set(int64_t unix_seconds) { now_ = unix_seconds; }

 private:
  int64_t now_;
};

}  // namespace keygate
