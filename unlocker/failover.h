// Getting a volume's secret from its key servers: servers in the token's
// order, a short connect timeout so a dead or silent server costs about a
// second, and (with a deadline) rounds of retries with jittered exponential
// backoff until the deadline, after which the caller falls back to the
// passphrase prompt.
#pragma once

#include <json/value.h>

#include "core/secret.h"
#include "core/status.h"
#include "unlocker/evidence.h"
#include "unlocker/luks.h"
#include "unlocker/tpm_attest.h"

namespace keygate::unlocker {

struct RetryPolicy {
  long deadline_ms = 0;          // 0: one round, no retries
  long connect_timeout_ms = 1000;
  long request_timeout_ms = 5000;
  long initial_backoff_ms = 500;
  long max_backoff_ms = 8000;
};

// Evidence comes from `evidence` (started by the caller, so detection
// overlaps reading the header); a collection that failed is tried again in
// the next round. The most telling failure is
// returned: a policy refusal over an untrusted server over an unreachable
// one. A round in which every server refused ends the attempt (no
// hammering); unreachable servers are retried until the deadline, with a
// last round a connection timeout (or half the time left) before it when
// the next backoff would pass it.
// With `tpm` (a TPM-bound volume), every request carries a quote.
Result<SecretBuffer> fetch_volume_secret(const KeygateToken& token, EvidenceCollector& evidence,
                                         TpmAttester* tpm, const RetryPolicy& policy);

// The delay before retry round `round` (1-based): initial * 2^(round-1),
// capped, with +/-50% jitter so a booting fleet does not retry in step.
long backoff_delay_ms(const RetryPolicy& policy, int round);

}  // namespace keygate::unlocker
