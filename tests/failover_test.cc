#include "unlocker/failover.h"

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

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

// A clock that moves only when told: requests "take" the time the fake
// server says, sleeps advance it at once. No test here waits on the wall
// clock.
class FakeRetryClock final : public RetryClock {
 public:
  long now_ms() override { return now; }
  void sleep_ms(long ms) override {
    EXPECT_GE(ms, 0);
    sleeps.push_back(ms);
    now += ms;
  }
  long now = 1000000;
  std::vector<long> sleeps;
};

struct Asked {
  std::string url;
  long at_ms, request_ms, connect_ms;
};

// Servers that answer with `kind` (kOk: release) after `takes_ms`.
struct FakeServers {
  FakeRetryClock& clock;
  std::map<std::string, ErrorKind> kinds;
  long takes_ms = 0;
  std::vector<Asked> asked;

  AskServer ask() {
    return [this](const std::string& url, long request_ms, long connect_ms) -> Result<SecretBuffer> {
      asked.push_back({url, clock.now, request_ms, connect_ms});
      clock.now += std::min(takes_ms, request_ms);
      const ErrorKind kind = kinds.at(url);
      if (kind == ErrorKind::kOk) return SecretBuffer::random(32);
      return Status::error(kind, url + ": failed");
    };
  }
};

RetryPolicy deadline_policy(long deadline_ms) {
  RetryPolicy p;
  p.deadline_ms = deadline_ms;
  return p;
}

TEST(RetryLoop, WithoutADeadlineMakesOnePassAndReturnsTheMostTellingFailure) {
  FakeRetryClock clock;
  FakeServers servers{clock, {{"a", ErrorKind::kUnavailable}, {"b", ErrorKind::kRefused},
                              {"c", ErrorKind::kUntrusted}}};
  auto r = ask_servers_until_deadline({"a", "b", "c"}, "v", RetryPolicy{}, clock, servers.ask());
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().kind(), ErrorKind::kRefused);
  EXPECT_EQ(servers.asked.size(), 3u);
  EXPECT_TRUE(clock.sleeps.empty());
}

TEST(RetryLoop, ARoundOfRefusalsEndsAtOnceEvenWithADeadline) {
  FakeRetryClock clock;
  FakeServers servers{clock, {{"a", ErrorKind::kRefused}, {"b", ErrorKind::kRefused}}};
  auto r = ask_servers_until_deadline({"a", "b"}, "v", deadline_policy(120000), clock, servers.ask());
  EXPECT_EQ(r.status().kind(), ErrorKind::kRefused);
  EXPECT_EQ(servers.asked.size(), 2u);
  EXPECT_TRUE(clock.sleeps.empty());
}

TEST(RetryLoop, FailsOverToTheNextServerInTheSameRound) {
  FakeRetryClock clock;
  FakeServers servers{clock, {{"a", ErrorKind::kUnavailable}, {"b", ErrorKind::kOk}}};
  auto r = ask_servers_until_deadline({"a", "b"}, "v", deadline_policy(30000), clock, servers.ask());
  EXPECT_TRUE(r.is_ok());
  EXPECT_EQ(servers.asked.size(), 2u);
  EXPECT_TRUE(clock.sleeps.empty());
}

TEST(RetryLoop, RetriesUnreachableServersUntilTheDeadlineAndNeverPastIt) {
  FakeRetryClock clock;
  FakeServers servers{clock, {{"a", ErrorKind::kUnavailable}}};
  servers.takes_ms = 1000;  // a dead server costs the connect timeout
  const long start = clock.now;
  auto r = ask_servers_until_deadline({"a"}, "v", deadline_policy(30000), clock, servers.ask());
  EXPECT_EQ(r.status().kind(), ErrorKind::kUnavailable);
  ASSERT_GT(servers.asked.size(), 3u);
  for (const Asked& a : servers.asked) {
    // No request starts after the deadline or is given time past it.
    EXPECT_LT(a.at_ms, start + 30000);
    EXPECT_LE(a.at_ms + a.request_ms, start + 30000);
    EXPECT_LE(a.connect_ms, a.request_ms);
  }
  // The last round starts shortly before the deadline: within a connect
  // timeout of it (or half the time that was left).
  EXPECT_GE(servers.asked.back().at_ms, start + 30000 - 1000 - 1000);
  // Gone by the deadline (plus the last request's time, bounded by it).
  EXPECT_LE(clock.now, start + 30000);
  // Backoff grew between rounds (jitter aside: 500 ms base doubling to 8 s).
  ASSERT_GE(clock.sleeps.size(), 3u);
  EXPECT_LT(clock.sleeps[0], 750);
  EXPECT_GE(clock.sleeps[2], 1000);
}

TEST(RetryLoop, AServerBackWithinTheDeadlineReleases) {
  FakeRetryClock clock;
  FakeServers servers{clock, {{"a", ErrorKind::kUnavailable}}};
  int calls = 0;
  auto flaky = [&](const std::string& url, long request_ms, long connect_ms) -> Result<SecretBuffer> {
    if (++calls == 3) return SecretBuffer::random(32);
    return servers.ask()(url, request_ms, connect_ms);
  };
  auto r = ask_servers_until_deadline({"a"}, "v", deadline_policy(60000), clock, flaky);
  EXPECT_TRUE(r.is_ok());
  EXPECT_EQ(calls, 3);
  EXPECT_EQ(clock.sleeps.size(), 2u);
}

TEST(RetryLoop, ASlowServerIsGivenOnlyTheTimeLeft) {
  FakeRetryClock clock;
  FakeServers servers{clock, {{"a", ErrorKind::kUnavailable}}};
  servers.takes_ms = 5000;  // every request runs to its timeout
  RetryPolicy p = deadline_policy(7000);
  auto r = ask_servers_until_deadline({"a"}, "v", p, clock, servers.ask());
  EXPECT_FALSE(r.is_ok());
  ASSERT_GE(servers.asked.size(), 2u);
  EXPECT_EQ(servers.asked[0].request_ms, 5000);
  // The second request gets what is left of the 7 s, not another 5 s.
  EXPECT_LE(servers.asked[1].at_ms + servers.asked[1].request_ms, servers.asked[0].at_ms + 7000);
}

TEST(RetryLoop, NoServersIsAConfigurationError) {
  FakeRetryClock clock;
  FakeServers servers{clock, {}};
  auto r = ask_servers_until_deadline({}, "v", deadline_policy(1000), clock, servers.ask());
  EXPECT_EQ(r.status().kind(), ErrorKind::kInvalidArgument);
}

}  // namespace
}  // namespace keygate::unlocker
