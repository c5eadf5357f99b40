// Getting a volume's secret from its key servers: servers in the token's
// order, a short connect timeout so a dead or silent server costs about a
// second, and (with a deadline) rounds of retries with jittered exponential
// backoff until the deadline, after which the caller falls back to the
// passphrase prompt.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "core/secret.h"
#include "core/status.h"
#include "unlocker/evidence.h"
#include "unlocker/token.h"
#include "unlocker/tpm_attest.h"

namespace keygate::unlocker {

struct RetryPolicy {
  long deadline_ms = 0;          // 0: one round, no retries
  long connect_timeout_ms = 1000;
  long request_timeout_ms = 5000;
  long initial_backoff_ms = 500;
  long max_backoff_ms = 8000;
};

// Monotonic time and waiting, as a seam: the retry loop's deadline
// arithmetic is unit-tested on a fake that advances without sleeping.
class RetryClock {
 public:
  virtual ~RetryClock() = default;
  virtual long now_ms() = 0;  // monotonic milliseconds, any origin
  virtual void sleep_ms(long ms) = 0;
};
// std::chrono::steady_clock and std::this_thread::sleep_for.
RetryClock& steady_retry_clock();

// One request to one server, with the time it may take in all and for the
// connection (TCP and TLS).
using AskServer =
    std::function<Result<SecretBuffer>(const std::string& url, long request_ms, long connect_ms)>;

// The loop itself. The most telling failure is returned: a policy refusal
// over an untrusted server over a bad request over an unreachable one. A
// round in which every server refused ends the attempt (no hammering);
// other failures are retried until the deadline, with a last round a
// connection timeout (or half the time left) before it when the next backoff
// would pass it. No request is given more time than is left.
Result<SecretBuffer> ask_servers_until_deadline(const std::vector<std::string>& servers,
                                                const std::string& volume_id,
                                                const RetryPolicy& policy, RetryClock& clock,
                                                const AskServer& ask);

// The loop over the token's servers with real requests: evidence from
// `evidence` (started by the caller, so detection overlaps reading the
// header; a collection that failed is tried again in the next round) and,
// with `tpm` (a TPM-bound volume), a quote in every request.
Result<SecretBuffer> fetch_volume_secret(const KeygateToken& token, EvidenceCollector& evidence,
                                         TpmAttester* tpm, const RetryPolicy& policy);

// The delay before retry round `round` (1-based): initial * 2^(round-1),
// capped, with +/-50% jitter so a booting fleet does not retry in step.
long backoff_delay_ms(const RetryPolicy& policy, int round);

}  // namespace keygate::unlocker
