#include "core/clock.h"

#include <ctime>

namespace keygate {

int64_t SystemClock::now_unix() const { return static_cast<int64_t>(time(nullptr)); }

int64_t SystemClock::monotonic_ms() const {
  timespec t{};
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<int64_t>(t.tv_sec) * 1000 + t.tv_nsec / 1000000;
}

}  // namespace keygate
