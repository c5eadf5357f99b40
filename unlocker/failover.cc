#include "unlocker/failover.h"

#include <openssl/rand.h>

#include <algorithm>
#include <chrono>
#include <thread>

#include "core/log.h"
#include "unlocker/server_client.h"

namespace keygate::unlocker {
namespace {

int rank(ErrorKind k) {
  switch (k) {
    case ErrorKind::kRefused: return 4;
    case ErrorKind::kUntrusted:
    case ErrorKind::kIntegrity: return 3;
    case ErrorKind::kInvalidArgument: return 2;
    default: return 1;
  }
}

class SteadyRetryClock final : public RetryClock {
 public:
  long now_ms() override {
    return static_cast<long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                 std::chrono::steady_clock::now().time_since_epoch())
                                 .count());
  }
  void sleep_ms(long ms) override { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }
};

}  // namespace

RetryClock& steady_retry_clock() {
  static SteadyRetryClock clock;
  return clock;
}

long backoff_delay_ms(const RetryPolicy& policy, int round) {
  long base = policy.initial_backoff_ms;
  for (int i = 1; i < round && base < policy.max_backoff_ms; ++i) base *= 2;
  base = std::min(base, policy.max_backoff_ms);
  uint32_t r = 0;
  RAND_bytes(reinterpret_cast<unsigned char*>(&r), sizeof(r));
  // Uniform in [base/2, base*3/2).
  return base / 2 + static_cast<long>(r % static_cast<uint32_t>(std::max(base, 1L)));
}

Result<SecretBuffer> ask_servers_until_deadline(const std::vector<std::string>& servers,
                                                const std::string& volume_id,
                                                const RetryPolicy& policy, RetryClock& clock,
                                                const AskServer& ask) {
  if (servers.empty()) return Status::error(ErrorKind::kInvalidArgument, "no key server configured");
  const long deadline = clock.now_ms() + policy.deadline_ms;
  Status worst;
  bool last_round = false;
  for (int round = 1;; ++round) {
    bool all_refused = true;
    for (const auto& url : servers) {
      long request_ms = policy.request_timeout_ms;
      if (policy.deadline_ms > 0) request_ms = std::min(request_ms, deadline - clock.now_ms());
      if (request_ms <= 0) {
        all_refused = false;
        break;
      }
      auto secret = ask(url, request_ms, std::min(policy.connect_timeout_ms, request_ms));
      if (secret.is_ok()) {
        log_info(str_cat("volume ", volume_id, ": key released by ", url,
                         round > 1 ? str_cat(" (round ", round, ")") : ""));
        return secret;
      }
      log_warning(secret.status().message());
      if (secret.status().kind() != ErrorKind::kRefused) all_refused = false;
      if (worst.is_ok() || rank(secret.status().kind()) >= rank(worst.kind())) {
        worst = secret.status();
      }
    }
    if (worst.is_ok()) {
      // The deadline passed before any server was asked.
      return Status::error(ErrorKind::kUnavailable,
                           str_cat("volume ", volume_id, ": deadline reached before a server was asked"));
    }
    if (all_refused || policy.deadline_ms <= 0) return worst;
    long wait = backoff_delay_ms(policy, round);
    const long left = deadline - clock.now_ms();
    if (left <= wait) {
      // Rather than stop early, one last round starts shortly before the
      // deadline (a connection timeout before it, or half the time left).
      if (last_round || left <= 0) {
        log_warning(str_cat("volume ", volume_id, ": deadline of ", policy.deadline_ms / 1000,
                            " s reached after ", round, " round(s)"));
        return worst;
      }
      last_round = true;
      wait = left - std::min(left / 2, policy.connect_timeout_ms);
    }
    log_info(str_cat("volume ", volume_id, ": retrying in ", wait, " ms (", left / 1000,
                     " s left)"));
    clock.sleep_ms(wait);
  }
}

Result<SecretBuffer> fetch_volume_secret(const KeygateToken& token, EvidenceCollector& evidence,
                                         TpmAttester* tpm, const RetryPolicy& policy) {
  RetryClock& clock = steady_retry_clock();
  // A release that needs approval waits within the deadline (without one:
  // until its request expires).
  ApprovalWait wait{[&clock] { return clock.now_ms(); }, [&clock](long ms) { clock.sleep_ms(ms); },
                    policy.deadline_ms > 0 ? clock.now_ms() + policy.deadline_ms : 0};
  return ask_servers_until_deadline(
      token.servers, token.volume_id, policy, clock,
      [&](const std::string& url, long request_ms, long connect_ms) {
        ServerEndpoint server{url, token.ca_pem, request_ms, connect_ms};
        return request_volume_secret(server, token.volume_id, evidence, tpm, &wait);
      });
}

}  // namespace keygate::unlocker
