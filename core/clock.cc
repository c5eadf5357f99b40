#include "core/clock.h"

#include <ctime>

namespace keygate {

int64_t SystemClock::now_unix() const { return static_cast<int64_t>(time(nullptr)); }

}  // namespace keygate
