// Talks to keygate-server: challenge, unlock, and two-phase enrollment.
// Each call classifies failures: kUnavailable (retry / next server),
// kRefused (403: do not hammer), kUntrusted (TLS), kIntegrity (envelope
// altered), kInvalidArgument (the server said our request was bad).
#pragma once

#include <json/value.h>

#include <functional>
#include <string>

#include "core/crypto.h"
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

// How long a release may wait for people to approve it (a 202 from the
// server): until `until_ms` on `now_ms`'s clock, or, when that is 0, until
// the request expires. Polls back off from 1 s to 5 s.
struct ApprovalWait {
  std::function<long()> now_ms;
  std::function<void(long)> sleep_ms;
  long until_ms = 0;
};

// Asks `server` to release the secret of `volume_id`, presenting evidence
// from `evidence` bound to the challenge (asked for once the challenge has
// arrived; detection and AWS's fetch overlap the TLS handshake). An
// evidence failure is returned as is (kUnavailable). With `tpm`, a quote
// over the same binding goes along. A release that needs approval prints
// "waiting for approval: request <id> (volume <id>, instance <id>)" once
// and asks again, attested anew each time, within `wait` (null: it does
// not wait; kUnavailable); a denial or an expired request is kRefused.
Result<SecretBuffer> request_volume_secret(const ServerEndpoint& server,
                                           const std::string& volume_id,
                                           EvidenceCollector& evidence, TpmAttester* tpm,
                                           const ApprovalWait* wait = nullptr);

// A 202 answer's approval request: its id (validated), the instance it is
// for and how long it has left, printable.
struct PendingApproval {
  std::string request_id;
  std::string instance;
  long expires_in_s = 0;
  int approvals = 0;
  int approvals_needed = 1;
};
Result<PendingApproval> read_pending_approval(const Json::Value& answer);

// The volume a registration replaces, and its secret (keygate rotate).
struct Replacing {
  std::string volume_id;
  const SecretBuffer* secret = nullptr;
};

// Registers a new volume. `enrollment_token` travels only in secret memory.
// With `replacing`, the server revokes that volume once the new one is
// confirmed, if it was bound to this instance alone.
// `evidence` may be null (image builders enrolling offline); with `tpm`,
// the attestation key and a quote (the PCR baseline) are registered.
Result<Enrollment> register_volume(const ServerEndpoint& server,
                                   const SecretBuffer& enrollment_token,
                                   EvidenceCollector* evidence, TpmAttester* tpm,
                                   const std::string& description,
                                   const Replacing* replacing = nullptr);

// Confirms that the keyslot holding `secret` is in place. The server
// accepts a confirm again, so one whose answer was lost can be repeated.
Status confirm_volume(const ServerEndpoint& server, const std::string& volume_id,
                      const SecretBuffer& secret);

// Tells the server that the keyslot for `volume_id` was removed (an
// enrollment that could not be confirmed): it revokes the pending volume.
// kConflict: the server had confirmed it (409 volume_active).
Status abandon_volume(const ServerEndpoint& server, const std::string& volume_id,
                      const SecretBuffer& secret);

// What the calls above make of the server's answers (untrusted bytes; split
// out so that each is tested and fuzzed on its own):
// An answer's status and body: the JSON object of a 200; otherwise the error
// classified as above, with the server's code and message made printable
// and bounded before they can reach a console.
Result<Json::Value> read_server_answer(long status, const std::string& body, const std::string& url);
// A challenge answer's nonce (kNonceSize bytes).
Result<Bytes> read_challenge(const Json::Value& answer);
// The secret in an unlock or registration answer's envelope, opened with
// `keys` for this volume and nonce; kIntegrity if it does not open or has
// the wrong size.
Result<SecretBuffer> open_envelope(const Json::Value& answer, const X25519KeyPair& keys,
                                   const std::string& volume_id, const Bytes& nonce);
// A registration answer: its volume id (validated) and secret.
Result<Enrollment> read_registration(const Json::Value& answer, const X25519KeyPair& keys,
                                     const Bytes& nonce);

}  // namespace keygate::unlocker
