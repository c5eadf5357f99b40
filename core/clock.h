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
  // Monotonic milliseconds (any origin): for rates, never for validity.
  virtual int64_t monotonic_ms() const = 0;
};

class SystemClock final : public Clock {
 public:
  int64_t now_unix() const override;
  int64_t monotonic_ms() const override;
};

// A clock that always reads the same instant. For tests.
class FixedClock final : public Clock {
 public:
  explicit FixedClock(int64_t unix_seconds) : now_(unix_seconds) {}
  int64_t now_unix() const override { return now_; }
  int64_t monotonic_ms() const override { return now_ * 1000 + ms_; }
  void set(int64_t unix_seconds) { now_ = unix_seconds; }
  // Moves the monotonic clock (and the wall clock, by whole seconds).
  void advance_ms(int64_t ms) {
    ms_ += ms;
    now_ += ms_ / 1000;
    ms_ %= 1000;
  }

 private:
  int64_t now_;
  int64_t ms_ = 0;
};

}  // namespace keygate
