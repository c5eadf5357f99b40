#include "unlocker/failover.h"

#include <gtest/gtest.h>

namespace keygate::unlocker {
namespace {

TEST(Backoff, GrowsExponentiallyWithBoundedJitter) {
  RetryPolicy p;
  p.initial_backoff_ms = 500;
  p.max_backoff_ms = 8000;
  for (int round = 1; round <= 8; ++round) {
    long base = std::min(500L << (round - 1), 8000L);
    long lo = base, hi = 0;
    for (int i = 0; i < 200; ++i) {
      long d = backoff_delay_ms(p, round);
      ASSERT_GE(d, base / 2) << round;
      ASSERT_LT(d, base / 2 + base) << round;
      lo = std::min(lo, d);
      hi = std::max(hi, d);
    }
    // Jitter really varies the delay.
    EXPECT_LT(lo, hi) << round;
  }
}

}  // namespace
}  // namespace keygate::unlocker
