// Talks to keygate-server: challenge, unlock, and two-phase enrollment.
// Each call classifies failures: kUnavailable (retry / next server),
// kRefused (403: do not hammer), kUntrusted (TLS), kIntegrity (envelope
// altered), kInvalidArgument (the server said our request was bad).
#pragma once

#include <json/value.h>

#include <string>

#include "core/secret.h"
#include "core/status.h"
#include "unlocker/evidence.h"
#include "unlocker/tpm_attest.h"

namespace keygate::unlocker {

struct ServerEndpoint {
  std::string url;  // https://host:port
  std::string ca_pem;
  long timeout_ms = 10000;          // whole request
  long connect_timeout_ms = 2000;   // TCP connect and TLS handshake
};

struct Enrollment {
  std::string volume_id;
  SecretBuffer secret;
  Json::Value policy;
};

// Asks `server` to release the secret of `volume_id`, presenting evidence
// from `evidence` bound to the challenge (asked for once the challenge has
// arrived; detection and AWS's fetch overlap the TLS handshake). An
// evidence failure is returned as is (kUnavailable). With `tpm`, a quote
// over the same binding goes along.
Result<SecretBuffer> request_volume_secret(const ServerEndpoint& server,
                                           const std::string& volume_id,
                                           EvidenceCollector& evidence, TpmAttester* tpm);

// Registers a new volume. `enrollment_token` travels only in secret memory.
// `evidence` may be null (image builders enrolling offline); with `tpm`,
// the attestation key and a quote (the PCR baseline) are registered.
Result<Enrollment> register_volume(const ServerEndpoint& server,
                                   const SecretBuffer& enrollment_token,
                                   EvidenceCollector* evidence, TpmAttester* tpm,
                                   const std::string& description);

// Confirms that the keyslot holding `secret` is in place. The server
// accepts a confirm again, so one whose answer was lost can be repeated.
Status confirm_volume(const ServerEndpoint& server, const std::string& volume_id,
                      const SecretBuffer& secret);

// Tells the server that the keyslot for `volume_id` was removed (an
// enrollment that could not be confirmed): it revokes the pending volume.
// kConflict: the server had confirmed it (409 volume_active).
Status abandon_volume(const ServerEndpoint& server, const std::string& volume_id,
                      const SecretBuffer& secret);

}  // namespace keygate::unlocker
