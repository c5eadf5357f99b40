// Network faults between the unlocker and its two peers: a fault proxy in
// front of the key server (TLS) and in front of the metadata service
// (plain HTTP) drops, delays, truncates, resets and corrupts the traffic at
// the handshake, the request and the response. Each unlock ends within its
// bound with the exit status SECURITY.md lists for that fault, and a fault
// that strikes once is ridden out by the retry within --deadline. No fault
// makes a wrong key reach the keyslot: that would be exit 6 (the key does
// not open it), which no case may give.
#include <memory>
#include <mutex>

#include "tests/fault_proxy.h"
#include "tests/keygate_fixture.h"

namespace keygate::testing {
namespace {

// Faults the connections from `from_connection` on (only that one if `once`).
class FaultPlan {
 public:
  void arm(Fault f, int from_connection, bool once) {
    std::lock_guard<std::mutex> lock(mu_);
    fault_ = f;
    from_ = from_connection;
    once_ = once;
  }
  Fault operator()(int n) {
    std::lock_guard<std::mutex> lock(mu_);
    if (n < from_ || (once_ && n != from_)) return Fault{};
    return fault_;
  }

 private:
  std::mutex mu_;
  Fault fault_;
  int from_ = 1 << 30;
  bool once_ = false;
};

struct Case {
  FaultKind kind;
  FaultPhase phase;
  int exit_code;
  int delay_ms = 1500;
};

// The same table for both links: a delay within the timeout is only a
// delay (the handshake's within the 1 s connect bound: past it, the server
// counts as unreachable); every other fault on every connection is "no key server
// reachable" (4), the status the initramfs retries and then falls back to
// the passphrase on. A corrupted TLS record is a transport failure, not an
// untrusted server: the record's authentication fails before any of it is
// read.
const Case kEveryFault[] = {
    {FaultKind::kDrop, FaultPhase::kHandshake, 4},     {FaultKind::kDrop, FaultPhase::kRequest, 4},
    {FaultKind::kDrop, FaultPhase::kResponse, 4},      {FaultKind::kDelay, FaultPhase::kHandshake, 0, 500},
    {FaultKind::kDelay, FaultPhase::kRequest, 0},      {FaultKind::kDelay, FaultPhase::kResponse, 0},
    {FaultKind::kTruncate, FaultPhase::kHandshake, 4}, {FaultKind::kTruncate, FaultPhase::kRequest, 4},
    {FaultKind::kTruncate, FaultPhase::kResponse, 4},  {FaultKind::kReset, FaultPhase::kHandshake, 4},
    {FaultKind::kReset, FaultPhase::kRequest, 4},      {FaultKind::kReset, FaultPhase::kResponse, 4},
    {FaultKind::kCorrupt, FaultPhase::kHandshake, 4},  {FaultKind::kCorrupt, FaultPhase::kRequest, 4},
    {FaultKind::kCorrupt, FaultPhase::kResponse, 4},
};
// The key server's handshake slower than the connect bound.
constexpr Case kSlowHandshake = {FaultKind::kDelay, FaultPhase::kHandshake, 4, 1500};

class FaultTest : public KeygateTest {
 protected:
  void SetUp() override {
    KeygateTest::SetUp();
    server_proxy_ = std::make_unique<FaultProxy>(server_.port, true,
                                                 [this](int n) { return server_plan_(n); });
    metadata_proxy_ = std::make_unique<FaultProxy>(emulator_.port, false,
                                                   [this](int n) { return metadata_plan_(n); });
    // Enrolled through the (clean) proxy: the volume's token names it.
    const std::string via = "https://127.0.0.1:" + std::to_string(server_proxy_->port());
    volume_ = new_volume_file();
    RunResult r = run({bin("keygate"), "enroll", volume_, "--format", "--no-recovery", "--server",
                       via, "--ca", server_.ca(), "--enrollment-token-file", make_token(server_),
                       "--metadata-url", emulator_.url()});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  // One unlock with `fault` on the server link or the metadata link.
  RunResult unlock_with(bool server_link, Fault fault, bool once, const char* deadline) {
    FaultPlan& plan = server_link ? server_plan_ : metadata_plan_;
    FaultProxy& proxy = server_link ? *server_proxy_ : *metadata_proxy_;
    plan.arm(fault, proxy.connections() + 1, once);
    const std::string metadata = "http://127.0.0.1:" + std::to_string(metadata_proxy_->port());
    RunResult r = run({bin("keygate"), "unlock", volume_, "--verify-only", "--metadata-url",
                       metadata, "--timeout", "3", "--deadline", deadline});
    plan.arm(Fault{}, 1 << 30, false);
    return r;
  }

  void expect_every_fault_ends_in_time(bool server_link) {
    std::vector<Case> cases(std::begin(kEveryFault), std::end(kEveryFault));
    if (server_link) cases.push_back(kSlowHandshake);
    for (const Case& c : cases) {
      const std::string what = std::string(server_link ? "key server " : "metadata ") +
                               fault_kind_name(c.kind) +
                               (c.kind == FaultKind::kDelay ? " " + std::to_string(c.delay_ms) + " ms" : "") +
                               " at " + fault_phase_name(c.phase);
      FaultProxy& proxy = server_link ? *server_proxy_ : *metadata_proxy_;
      const int struck = proxy.faults();
      RunResult r = unlock_with(server_link, Fault{c.kind, c.phase, c.delay_ms}, false, "0");
      EXPECT_GT(proxy.faults(), struck) << what << ": the fault never struck";
      EXPECT_EQ(r.exit_code, c.exit_code) << what << "\n" << r.err;
      // One pass: the metadata fetch (2 s for AWS), then a request bounded
      // by --timeout 3, with room for a loaded machine.
      EXPECT_LT(r.seconds, 12) << what;
      EXPECT_NE(r.exit_code, 6) << what << ": a key reached the keyslot and did not open it";
      std::printf("%-40s exit %d in %4.1f s\n", what.c_str(), r.exit_code, r.seconds);
    }
  }

  FaultPlan server_plan_, metadata_plan_;
  std::unique_ptr<FaultProxy> server_proxy_, metadata_proxy_;
  std::string volume_;
};

TEST_F(FaultTest, EveryFaultOnTheKeyServerLinkEndsInTimeWithItsExitStatus) {
  expect_every_fault_ends_in_time(true);
}

TEST_F(FaultTest, EveryFaultOnTheMetadataLinkEndsInTimeWithItsExitStatus) {
  expect_every_fault_ends_in_time(false);
}

// A fault that strikes one connection is ridden out by the retry.
TEST_F(FaultTest, AFaultThatStrikesOnceIsRiddenOutWithinTheDeadline) {
  for (bool server_link : {true, false}) {
    for (FaultKind kind : {FaultKind::kDrop, FaultKind::kTruncate, FaultKind::kReset,
                           FaultKind::kCorrupt}) {
      const std::string what = std::string(server_link ? "key server " : "metadata ") +
                               fault_kind_name(kind) + " once";
      RunResult r = unlock_with(server_link, Fault{kind, FaultPhase::kResponse, 0}, true, "30");
      EXPECT_EQ(r.exit_code, 0) << what << "\n" << r.err;
      EXPECT_LT(r.seconds, 30) << what;
      std::printf("%-40s exit %d in %4.1f s\n", what.c_str(), r.exit_code, r.seconds);
    }
  }
}

}  // namespace
}  // namespace keygate::testing
