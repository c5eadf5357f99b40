// The key server's API logic, independent of HTTP: each call takes the
// request body and the peer's address and returns a status code and a JSON
// body. Every release and refusal is audited (store) and logged, without
// secrets. Refusal reasons go to the log; clients get a short code.
#pragma once

#include <json/value.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/clock.h"
#include "core/secret.h"
#include "server/approvals.h"
#include "server/evidence.h"
#include "server/operations.h"
#include "server/policy.h"
#include "server/policy_file.h"
#include "server/rate_limit.h"
#include "server/refusal.h"
#include "server/tpm_policy.h"
#include "server/store.h"

namespace keygate::server {

struct ServiceOptions {
  int nonce_ttl_seconds = 60;
  // Enrollment without a token: an instance whose verified identity has every
  // claim of a rule may register a per-instance volume under that rule.
  std::vector<EnrollmentTemplate> attestation_enrollment;
  // Every request from one source address, and the unlocks and
  // registrations of one verified instance (rate_limit.h).
  RateLimit per_source{50, 100};
  RateLimit per_instance{1, 20};
  // A registered volume not confirmed within this many seconds is revoked
  // (audited as enroll.expire): its client gave up or died.
  int64_t pending_ttl_seconds = 24 * 3600;
  // The policy file in effect (its named policies); null: none configured,
  // and a volume that names a policy is refused. With a store that shares
  // the policy (replicas), the store's newest version is put in it before
  // each use.
  PolicyRegistry* policies = nullptr;
  // Metrics and notifications (server/operations.h); null: none.
  Operations* operations = nullptr;
};

class KeyService {
 public:
  KeyService(Store& store, SecretBuffer kek, EvidenceTrust& trust, const Clock& clock,
             ServiceOptions options);

  ApiResponse challenge(const std::string& peer);
  ApiResponse unlock(std::string_view body, const std::string& peer);
  ApiResponse enroll_register(std::string_view body, const std::string& peer);
  ApiResponse enroll_confirm(std::string_view body, const std::string& peer);
  // A client that removed its keyslot after an enrollment it could not
  // confirm: a pending volume is revoked (audited), an active one is left
  // to an administrator (409 volume_active).
  ApiResponse enroll_abandon(std::string_view body, const std::string& peer);

  // Revokes the pending volumes older than pending_ttl_seconds, each on the
  // audit trail; returns how many. Registrations run it too, at most once a
  // minute, and a confirm that finds its own volume too old.
  Result<size_t> expire_pending_volumes();

 private:
  // One request as it is served: what the audit trail records of it.
  struct Call {
    const char* event;
    const std::string& peer;
    std::string volume_id;  // once known
    std::string platform;   // the evidence's platform, once read (for the metrics)
  };
  struct Attested;  // the fields every attested request carries, and their binding

  // The policy file's policy `name`, if it admits `identity` now.
  Result<NamedPolicy> check_named_policy(const std::string& name, const Identity& identity);
  // Puts the shared store's newest policy version in effect here if it is
  // newer than the one in effect (another replica loaded it).
  Status follow_shared_policy();

  // Approvals (server/approvals.h). The gate, for an unlock under a policy
  // that wants them: `wait` (a 202 naming the request, made if there is
  // none) or `grant`, an approved request, which the release spends.
  struct Gate {
    std::optional<ApiResponse> wait;
    std::optional<Approval> grant;
  };
  // `pcrs`: the quote's PCR values the volume does not accept (policy
  // pcr_change "approval"), for the request to show; null: none.
  Checked<Gate> approval_gate(Call& call, const VolumePolicy& policy, const NamedPolicy& named,
                              const Identity& identity, const Json::Value& request, const TpmCheck* pcrs);
  ApiResponse waiting(const Approval& request);
  // Marks `granted` used with the release's audit record, in one
  // transaction; a refusal if it could not.
  // With `counted`, the release also counts against max_releases.
  std::optional<Refusal> spend_approval(const Call& call, const Approval& granted, const Identity& identity,
                                        const CountedRelease* counted);
  // manual-first: the volume knows the instance from now on.
  void remember_instance(const VolumeRecord& record, const Identity& identity);
  // A PCR change approved: its values join the volume's accepted ones.
  void allow_approved_pcrs(const Call& call, const VolumeRecord& record, const Approval& granted);

  // A store call's time, for the metrics.
  void store_took(const char* op, std::chrono::steady_clock::time_point started);
  // Audits a refusal (or lets a served answer through) and answers.
  ApiResponse answer(const Call& call, Checked<ApiResponse> outcome);
  // One request: the source address's rate limit, then `step`, answered.
  using Step = Checked<ApiResponse> (KeyService::*)(Call& call, std::string_view body);
  ApiResponse serve(const char* event, std::string_view body, const std::string& peer, Step step);
  Checked<ApiResponse> serve_unlock(Call& call, std::string_view body);
  Checked<ApiResponse> serve_register(Call& call, std::string_view body);
  Checked<ApiResponse> serve_confirm(Call& call, std::string_view body);
  Checked<ApiResponse> serve_abandon(Call& call, std::string_view body);
  // A request about one volume that proves it holds the volume's secret
  // (confirm, abandon): its record once `proof` is expected(secret, id).
  using ProofOf = Bytes (*)(const SecretBuffer& secret, std::string_view volume_id);
  Checked<VolumeRecord> load_proven_volume(Call& call, std::string_view body, ProofOf expected,
                                           const char* what);

  Checked<Json::Value> parse_request(std::string_view body);
  // A request about one volume: its body, and its volume_id (valid, and
  // recorded in `call` for the trail).
  Checked<Json::Value> parse_volume_request(Call& call, std::string_view body);
  // nonce and client_public_key, and the binding value over them and
  // `volume_id` (computed once, here).
  Checked<Attested> parse_attested(const Json::Value& request, const std::string& volume_id);
  // Spends the request's nonce (whatever the request's outcome).
  std::optional<Refusal> spend_nonce(const Bytes& nonce);
  Checked<VolumeRecord> load_volume(const std::string& volume_id);
  Checked<VolumePolicy> stored_policy(const VolumeRecord& record);
  // The TPM part of an unlock: the quote, the PCR values, and an armed
  // accept-next (applied here). Values the volume does not accept are
  // refused, unless `named` says pcr_change "approval": then they are put
  // in *changed, for people to decide.
  std::optional<Refusal> check_tpm(const Call& call, const VolumeRecord& record,
                                   const VolumePolicy& policy, const Json::Value& request,
                                   const Attested& attested, const NamedPolicy* named, TpmCheck* changed);
  // The template a registration enrolls under: a token's, or the first
  // attestation-enrollment rule admitting `identity`. `how` says which;
  // `token_hash` is set to the token's hash (its use is not spent here).
  Checked<EnrollmentTemplate> enrollment_template(const std::string& token,
                                                  const std::optional<Identity>& identity,
                                                  std::string* how,
                                                  std::optional<Bytes>* token_hash);
  // The volume a registration replaces (keygate rotate): the client proves it
  // holds that volume's secret now; a volume bound to this instance alone is
  // returned (revoked once the new one is confirmed), an image group's is
  // not (""). A rotation token's volume if the request names none.
  Checked<std::string> replaced_volume(const Json::Value& request, const Bytes& nonce,
                                       const VolumePolicy& policy, const EnrollmentTemplate& tmpl);
  // A confirmed volume that a rotation made revokes the
  // volume it replaces (audited as rotate); a refusal if that cannot be
  // done, so that the client asks again.
  std::optional<Refusal> retire_rotated_volume(const Call& call, const VolumeRecord& confirmed);
  // A 429 when `key`'s bucket is empty (audited once per burst).
  std::optional<Refusal> limit(RateLimiter& limiter, const std::string& key, const char* what);
  std::optional<Refusal> limit_instance(const Identity& identity);
  // Appends to the audit trail, then logs the line. A failed append is
  // logged and returned, so that a release can be withheld.
  Status write_audit(const Call& call, const char* outcome, const std::string& detail);
  // The server log's line for an audit record, and whether it was written.
  void log_audit(const AuditEvent& event, const Status& written);
  // The refusal for a secret (or a registration) the trail could not record.
  Refusal unaudited(const Call& call);

  Store& store_;
  SecretBuffer kek_;
  EvidenceVerifier evidence_;
  const Clock& clock_;
  ServiceOptions options_;
  RateLimiter per_source_;
  RateLimiter per_instance_;
  std::atomic<int64_t> last_expiry_{0};  // when registrations last swept
};

// Seals a volume secret under the KEK, bound to the volume id.
Result<Bytes> seal_volume_secret(const SecretBuffer& kek, const SecretBuffer& secret,
                                 const std::string& volume_id);
Result<SecretBuffer> open_volume_secret(const SecretBuffer& kek, const Bytes& sealed,
                                        const std::string& volume_id);

// A random RFC 4122 version-4 UUID.
std::string new_volume_id();

// Creates a one-time (or `uses`-time) enrollment token with `event`, its
// record on the trail (one transaction); returns the token value, shown
// once. Only its SHA-256 is stored.
Result<std::string> create_enrollment_token(Store& store, const EnrollmentTemplate& tmpl,
                                            int64_t now, int64_t ttl_seconds, int uses, const AuditEvent& event);

}  // namespace keygate::server
