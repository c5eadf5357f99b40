#include "server/key_service.h"

#include <algorithm>
#include <chrono>

#include "core/crypto.h"
#include "core/envelope.h"
#include "core/json.h"
#include "core/log.h"
#include "core/protocol.h"
#include "server/approvals.h"
#include "server/tpm_policy.h"

namespace keygate::server {
namespace {

std::string store_aad(const std::string& volume_id) { return "keygate-v1 store " + volume_id; }

Checked<Bytes> decode_fixed(const Json::Value& obj, const char* key, size_t size) {
  auto text = json_string(obj, key, size * 2 + 8);
  if (!text.is_ok()) return bad_request(text.status().message());
  auto bytes = base64_decode(text.value());
  if (!bytes.is_ok() || bytes->size() != size) {
    return bad_request(str_cat("field '", key, "' must be base64 of ", size, " bytes"));
  }
  return std::move(bytes).value();
}

}  // namespace

Result<Bytes> seal_volume_secret(const SecretBuffer& kek, const SecretBuffer& secret,
                                 const std::string& volume_id) {
  return aes_gcm_seal(kek, secret.data(), secret.size(), store_aad(volume_id));
}

Result<SecretBuffer> open_volume_secret(const SecretBuffer& kek, const Bytes& sealed,
                                        const std::string& volume_id) {
  auto s = aes_gcm_open(kek, sealed, store_aad(volume_id));
  if (!s.is_ok()) {
    return Status::error(ErrorKind::kIntegrity,
                         str_cat("stored secret of volume ", volume_id,
                                 " does not open under this KEK (wrong KEK or altered store)"));
  }
  return s;
}

std::string new_volume_id() {
  Bytes b = random_bytes(16);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  std::string h = hex_encode(b);
  return h.substr(0, 8) + "-" + h.substr(8, 4) + "-" + h.substr(12, 4) + "-" + h.substr(16, 4) +
         "-" + h.substr(20);
}

Result<std::string> create_enrollment_token(Store& store, const EnrollmentTemplate& tmpl,
                                            int64_t now, int64_t ttl_seconds, int uses, const AuditEvent& event) {
  if (ttl_seconds <= 0 || uses <= 0) {
    return Status::error(ErrorKind::kInvalidArgument, "token lifetime and uses must be positive");
  }
  Bytes raw = random_bytes(24);
  std::string token = "kgt_" + base64url_encode(raw.data(), raw.size());
  KEYGATE_RETURN_IF_ERROR(
      store.create_enrollment_token(sha256(token), to_json(tmpl.to_json()), now + ttl_seconds, uses, event));
  return token;
}

struct KeyService::Attested {
  Bytes nonce;
  Bytes client_public_key;
  Bytes binding;  // binding_value(nonce, client key, volume id)
};

KeyService::KeyService(Store& store, SecretBuffer kek, EvidenceTrust& trust, const Clock& clock,
                       ServiceOptions options)
    : store_(store), kek_(std::move(kek)), evidence_(trust, clock), clock_(clock),
      options_(options), per_source_(options.per_source), per_instance_(options.per_instance) {}

std::optional<Refusal> KeyService::limit(RateLimiter& limiter, const std::string& key,
                                         const char* what) {
  RateLimiter::Decision d;
  if (store_.shares_rate_limits() && limiter.limit().enabled()) {
    // Replicas count one client together, in the shared store. A store
    // that cannot be asked lets the request on: its next step fails on the
    // same store and answers 503.
    auto taken = store_.take_rate_token(str_cat(what, " ", key), limiter.limit().per_second,
                                        limiter.limit().burst);
    if (taken.is_ok())
      d = RateLimiter::Decision{taken->allowed, taken->burst_start, taken->retry_after_ms};
  } else {
    d = limiter.take(key, clock_.monotonic_ms());
  }
  if (d.allowed) return std::nullopt;
  Refusal r;
  r.http_status = 429;
  r.code = api::kErrRateLimited;
  r.retry_after_seconds = static_cast<int>(std::max<int64_t>(1, (d.retry_after_ms + 999) / 1000));
  r.client_message = str_cat("too many requests from this ", what, "; retry in ",
                             r.retry_after_seconds, " s");
  r.audit_detail = str_cat("rate limit per ", what, " (", printable(key, 128),
                           ") reached; the rest of this burst is refused unaudited");
  r.audited = !d.burst_start;
  return r;
}

std::optional<Refusal> KeyService::limit_instance(const Identity& identity) {
  const PlatformSpec* spec = platform_spec(identity.platform);
  const std::string instance = spec != nullptr ? identity.claim(spec->instance_claim) : "";
  return limit(per_instance_, str_cat(identity.platform, ":", instance), "instance");
}

// Deny by default: no policy file, or a file without the name, admits no one.
Result<NamedPolicy> KeyService::check_named_policy(const std::string& name, const Identity& identity) {
  KEYGATE_RETURN_IF_ERROR(follow_shared_policy());
  auto set = options_.policies != nullptr ? options_.policies->current() : nullptr;
  if (set == nullptr) {
    return Status::error(ErrorKind::kRefused, str_cat("policy ", name, ": no policy file is in effect"));
  }
  auto it = set->policies.find(name);
  if (it == set->policies.end()) {
    return Status::error(ErrorKind::kRefused, str_cat("policy ", name, " is not in ", set->source, " (sha256 ",
                                                      set->sha256.substr(0, 16), ")"));
  }
  KEYGATE_RETURN_IF_ERROR(evaluate_named_policy(it->second, identity, clock_.now_unix()));
  return it->second;
}

Status KeyService::follow_shared_policy() {
  if (options_.policies == nullptr || !store_.shares_policy()) return Status::ok();
  auto latest = store_.latest_policy(false);
  if (!latest.is_ok()) return latest.status();
  auto current = options_.policies->current();
  if (latest->version == 0 || (current != nullptr && current->version >= latest->version))
    return Status::ok();
  auto newest = store_.latest_policy(true);
  if (!newest.is_ok()) return newest.status();
  const std::string source = str_cat("policy version ", newest->version);
  if (hex_encode(sha256(newest->text)) != newest->sha256) {
    return Status::error(ErrorKind::kIntegrity,
                         str_cat(source, " does not match its sha256; the one in effect stays"));
  }
  auto set = parse_policy_file(newest->text, source);
  if (!set.is_ok()) {
    // A newer server's policy this one cannot read: deny by default.
    return Status::error(
        ErrorKind::kRefused,
        str_cat(source, " (in force) is not readable here: ", set.status().message()));
  }
  set->version = newest->version;
  set->loaded_by = newest->loaded_by;
  options_.policies->install(std::make_shared<const PolicySet>(std::move(set).value()));
  log_info(str_cat("policy ", source, " (sha256 ", newest->sha256,
                   ") is in force, loaded by another replica"));
  return Status::ok();
}

Status KeyService::write_audit(const Call& call, const char* outcome, const std::string& detail) {
  const AuditEvent event{clock_.now_unix(), call.event, outcome, call.volume_id, call.peer, detail};
  const auto started = std::chrono::steady_clock::now();
  Status s = store_.append_audit(event);
  store_took("audit_append", started);
  log_audit(event, s);
  return s;
}

void KeyService::log_audit(const AuditEvent& e, const Status& written) {
  const std::string line =
      str_cat(e.event, " ", e.outcome, " volume=", e.volume_id.empty() ? "-" : e.volume_id,
              " peer=", e.peer, e.detail.empty() ? "" : " detail=", printable(e.detail, 1024));
  if (!written.is_ok()) {
    log_error(str_cat("audit write failed (", line, "): ", written.message()));
    if (options_.operations != nullptr) options_.operations->audit_failed(e, written.message());
  } else if (e.outcome == "refused" || e.outcome == "error") {
    log_warning(line);
  } else {
    log_info(line);
  }
}

// A secret leaves the server only once its release is in the audit trail.
Refusal KeyService::unaudited(const Call& call) {
  log_error(str_cat(call.event, " volume=", call.volume_id,
                    ": not sent, the audit log cannot be written"));
  Refusal r = server_error("the audit log cannot be written; no key is released until it can",
                           "audit trail unavailable");
  r.http_status = 503;
  r.code = api::kErrAuditUnavailable;
  r.retry_after_seconds = 2;
  r.audited = true;
  return r;
}

ApiResponse KeyService::answer(const Call& call, Checked<ApiResponse> outcome) {
  if (outcome.ok()) return std::move(outcome.value());
  const Refusal& r = outcome.refusal();
  if (!r.audited) {
    // A refusal is answered even when the trail cannot take it (logged).
    (void)write_audit(call, r.server_fault ? "error" : "refused", r.audit_detail);
  }
  if (Operations* ops = options_.operations) {
    ops->refused(call.platform, r.code);
    if (std::string_view(r.code) == api::kErrEvidenceInvalid) {
      ops->evidence_failed(r.client_message.rfind("TPM", 0) == 0 ? "tpm_quote" : call.platform);
    }
  }
  return r.response();
}

void KeyService::store_took(const char* op, std::chrono::steady_clock::time_point started) {
  if (options_.operations == nullptr) return;
  options_.operations->store_took(
      op, std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
}

Checked<Json::Value> KeyService::parse_request(std::string_view body) {
  if (body.size() > api::kMaxRequestBody) {
    Refusal r = bad_request(str_cat("request body larger than ", api::kMaxRequestBody, " bytes"));
    r.code = api::kErrTooLarge;
    return r;
  }
  auto request = parse_json_object(body, api::kMaxRequestBody);
  if (!request.is_ok()) return bad_request(request.status().message());
  return std::move(request).value();
}

Checked<Json::Value> KeyService::parse_volume_request(Call& call, std::string_view body) {
  auto request = parse_request(body);
  if (!request.ok()) return request.refusal();
  auto id = json_string(request.value(), api::field::kVolumeId, api::kMaxVolumeIdLength);
  if (!id.is_ok() || !api::is_valid_volume_id(id.value())) {
    return bad_request("field 'volume_id' missing or malformed");
  }
  call.volume_id = id.value();
  return std::move(request.value());
}

Checked<KeyService::Attested> KeyService::parse_attested(const Json::Value& request,
                                                         const std::string& volume_id) {
  auto nonce = decode_fixed(request, api::field::kNonce, api::kNonceSize);
  if (!nonce.ok()) return nonce.refusal();
  auto key = decode_fixed(request, api::field::kClientPublicKey, kX25519KeySize);
  if (!key.ok()) return key.refusal();
  Attested a{std::move(nonce.value()), std::move(key.value()), {}};
  a.binding = binding_value(a.nonce, a.client_public_key, volume_id);
  return a;
}

std::optional<Refusal> KeyService::spend_nonce(const Bytes& nonce) {
  const auto started = std::chrono::steady_clock::now();
  auto fresh = store_.consume_nonce(nonce, clock_.now_unix());
  store_took("nonce_consume", started);
  if (!fresh.is_ok()) return store_error("store unavailable", fresh.status());
  if (!fresh.value()) {
    return refused(api::kErrNonceInvalid, "challenge nonce unknown, reused or expired",
                   "nonce unknown, reused or expired");
  }
  return std::nullopt;
}

Checked<VolumeRecord> KeyService::load_volume(const std::string& volume_id) {
  const auto started = std::chrono::steady_clock::now();
  auto record = store_.get_volume(volume_id);
  store_took("volume_get", started);
  if (!record.is_ok()) {
    // An unknown volume is told apart from a refused one only in the trail.
    if (record.status().kind() == ErrorKind::kNotFound) {
      return refused(api::kErrPolicyDenied, "not authorised for this volume", "unknown volume");
    }
    return store_error("store unavailable", record.status());
  }
  return std::move(record).value();
}

Checked<VolumePolicy> KeyService::stored_policy(const VolumeRecord& record) {
  auto json = parse_json_object(record.policy_json);
  if (!json.is_ok()) return server_error("stored policy unreadable", "stored policy unreadable");
  auto policy = VolumePolicy::from_json(json.value());
  if (!policy.is_ok()) return server_error("stored policy unreadable", policy.status().message());
  return std::move(policy).value();
}

ApiResponse KeyService::challenge(const std::string& peer) {
  const Call call{"challenge", peer, ""};
  if (auto r = limit(per_source_, source_key(peer), "address")) return answer(call, *r);
  Bytes nonce = random_bytes(api::kNonceSize);
  const int64_t now = clock_.now_unix();
  const auto started = std::chrono::steady_clock::now();
  Status s = store_.put_nonce(nonce, now, now + options_.nonce_ttl_seconds);
  store_took("nonce_put", started);
  if (!s.is_ok()) {
    // Not audited: a challenge discloses and decides nothing.
    log_error(str_cat("challenge for ", peer, ": ", s.message()));
    return refusal_for(s, api::kErrInternal, "could not record challenge").response();
  }
  ApiResponse r;
  r.body[api::field::kNonce] = base64_encode(nonce);
  r.body[api::field::kExpiresIn] = options_.nonce_ttl_seconds;
  return r;
}

std::optional<Refusal> KeyService::check_tpm(const Call& call, const VolumeRecord& record,
                                             const VolumePolicy& policy, const Json::Value& request,
                                             const Attested& attested, const NamedPolicy* named,
                                             TpmCheck* changed) {
  if (!request.isMember(api::field::kTpm)) {
    return refused(api::kErrTpmRequired, "this volume's policy requires a TPM quote",
                   "no TPM quote; the volume's policy requires one");
  }
  auto checked = check_tpm_evidence(*policy.tpm, request[api::field::kTpm], attested.binding);
  if (!checked.is_ok()) {
    return refusal_for(checked.status(), api::kErrEvidenceInvalid, "TPM quote did not verify");
  }
  if (checked->mismatched.empty()) return std::nullopt;
  const int64_t now = clock_.now_unix();
  if (policy.tpm->accept_next_until == 0 || now > policy.tpm->accept_next_until) {
    if (named != nullptr && named->pcr_change == "approval") {
      *changed = std::move(checked).value();  // for people to decide (approval_gate)
      return std::nullopt;
    }
    return refused(api::kErrPolicyDenied, "the TPM's PCR values are not accepted",
                   "PCR values not accepted: " + checked->describe_mismatch());
  }
  // Accept-next: this boot's values become the baseline, once.
  VolumePolicy updated = policy;
  updated.tpm->accept_next_until = 0;
  updated.tpm->pcrs.clear();
  for (const auto& [pcr, value] : checked->values) updated.tpm->pcrs[pcr] = {value};
  Status s = store_.update_volume_policy(record.id, record.policy_json, to_json(updated.to_json()), now);
  if (!s.is_ok()) {
    return refusal_for(s.with_context("accept-next not applied"), api::kErrPolicyDenied,
                       "the volume's policy changed; retry");
  }
  Call accepted{"tpm.accept_next", call.peer, call.volume_id};
  (void)write_audit(accepted, "ok", "new PCR baseline: " + checked->describe_mismatch());
  return std::nullopt;
}

ApiResponse KeyService::serve(const char* event, std::string_view body, const std::string& peer,
                              Step step) {
  Call call{event, peer, "", ""};
  const auto started = std::chrono::steady_clock::now();
  ApiResponse response = [&] {
    if (auto r = limit(per_source_, source_key(peer), "address")) return answer(call, *r);
    return answer(call, (this->*step)(call, body));
  }();
  Operations* ops = options_.operations;
  if (ops != nullptr && std::string_view(event) == "unlock") {
    if (response.status == 200) ops->released(call.platform);
    ops->unlock_took(std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  }
  return response;
}

ApiResponse KeyService::unlock(std::string_view body, const std::string& peer) {
  return serve("unlock", body, peer, &KeyService::serve_unlock);
}

Checked<ApiResponse> KeyService::serve_unlock(Call& call, std::string_view body) {
  auto request = parse_volume_request(call, body);
  if (!request.ok()) return request.refusal();
  auto attested = parse_attested(request.value(), call.volume_id);
  if (!attested.ok()) return attested.refusal();
  auto evidence = json_object(request.value(), api::field::kEvidence, true);
  if (!evidence.is_ok()) return bad_request(evidence.status().message());
  if (evidence->isObject() && evidence->size() == 1) call.platform = platform_label(evidence->getMemberNames()[0]);
  if (auto spent = spend_nonce(attested->nonce)) return *spent;
  auto record = load_volume(call.volume_id);
  if (!record.ok()) return record.refusal();
  if (record->state == VolumeState::kRevoked) {
    return refused(api::kErrRevoked, "volume has been revoked", "volume revoked");
  }
  if (record->state != VolumeState::kActive) {
    return refused(api::kErrNotEnrolled, "volume enrollment was never confirmed",
                   "enrollment not confirmed");
  }
  auto identity = evidence_.verify_identity(evidence.value(), attested->binding);
  if (!identity.is_ok()) {
    return refused(api::kErrEvidenceInvalid, "instance evidence did not verify",
                   identity.status().message());
  }
  if (auto r = limit_instance(identity.value())) return *r;
  auto policy = stored_policy(record.value());
  if (!policy.ok()) return policy.refusal();
  Status allowed = evaluate_policy(policy.value(), identity.value());
  if (!allowed.is_ok()) {
    return refused(api::kErrPolicyDenied, "instance does not satisfy the volume's policy",
                   str_cat(allowed.message(), " (", identity->summary(), ")"));
  }
  std::optional<NamedPolicy> named;
  if (!policy->named_policy.empty()) {
    auto admitted = check_named_policy(policy->named_policy, identity.value());
    if (!admitted.is_ok()) {
      return refused(api::kErrPolicyDenied, "instance does not satisfy the volume's policy",
                     str_cat(admitted.status().message(), " (", identity->summary(), ")"));
    }
    named = std::move(admitted).value();
  }
  if (policy->revokes(identity.value())) {
    return refused(api::kErrRevoked, "this instance's access to the volume has been revoked",
                   str_cat("instance revoked from the image group (", identity->summary(), ")"));
  }
  TpmCheck pcr_change;  // PCR values for people to decide on, if any
  if (policy->tpm) {
    if (auto r = check_tpm(call, record.value(), policy.value(), request.value(), attested.value(),
                           named ? &*named : nullptr, &pcr_change)) {
      return *r;
    }
  }
  // A policy that wants people to approve: the instance waits (202) until
  // they have, and is refused once they deny or the request expires.
  std::optional<Approval> granted;
  const bool pcrs_changed = !pcr_change.mismatched.empty();
  if (pcrs_changed || (named && named->approval != "automatic" &&
                       !(named->approval == "manual-first" && policy->knows(identity.value())))) {
    auto gate = approval_gate(call, policy.value(), *named, identity.value(), request.value(),
                              pcrs_changed ? &pcr_change : nullptr);
    if (!gate.ok()) return gate.refusal();
    if (gate->wait) return *gate->wait;
    granted = std::move(gate->grant);
  }
  auto secret = open_volume_secret(kek_, record->sealed_secret, call.volume_id);
  if (!secret.is_ok()) return server_error("volume secret unavailable", secret.status().message());
  auto wrapped = wrap_secret_for_client(secret.value(), attested->client_public_key, call.volume_id,
                                        attested->nonce);
  if (!wrapped.is_ok()) return bad_request("client public key unusable");
  // max_releases: this release is counted in its own audit record's transaction.
  std::optional<CountedRelease> counted;
  if (named && named->max_releases) {
    const int64_t now = clock_.now_unix();
    counted = CountedRelease{call.volume_id, policy->instance_of(identity.value()), now,
                             now - named->max_releases->second, named->max_releases->first};
  }
  if (granted) {
    // The approval is spent and the release audited in one transaction.
    if (auto r = spend_approval(call, *granted, identity.value(), counted ? &*counted : nullptr)) return *r;
    if (granted->mode == "manual-first") remember_instance(record.value(), identity.value());
    if (!granted->pcr_changes.empty()) allow_approved_pcrs(call, record.value(), *granted);
  } else if (counted) {
    const AuditEvent event{clock_.now_unix(), call.event, "released", call.volume_id, call.peer, identity->summary()};
    Status s = store_.record_counted_release(*counted, event);
    if (s.kind() == ErrorKind::kRefused) {
      return refused(api::kErrPolicyDenied, "this instance's releases for the period are used up",
                     str_cat("policy ", named->name, ": ", s.message(), " (", identity->summary(), ")"));
    }
    log_audit(event, s);
    if (!s.is_ok()) return unaudited(call);
  } else if (!write_audit(call, "released", identity->summary()).is_ok()) {
    return unaudited(call);
  }
  ApiResponse r;
  r.body[api::field::kVolumeId] = call.volume_id;
  r.body[api::field::kWrapped] = wrapped->to_json();
  return r;
}

ApiResponse KeyService::waiting(const Approval& request) {
  ApiResponse r;
  r.status = 202;
  r.retry_after_seconds = 2;
  r.body[api::field::kVolumeId] = request.volume_id;
  r.body[api::field::kApproval] = request.to_instance_json(clock_.now_unix());
  return r;
}

Checked<KeyService::Gate> KeyService::approval_gate(Call& call, const VolumePolicy& policy,
                                                    const NamedPolicy& named, const Identity& identity,
                                                    const Json::Value& request, const TpmCheck* pcrs) {
  // The PCR changes this quote shows, as a request records them.
  std::map<uint32_t, PcrChange> changes;
  if (pcrs != nullptr) {
    for (uint32_t pcr : pcrs->mismatched) changes[pcr] = PcrChange{policy.tpm->pcrs.at(pcr), pcrs->values.at(pcr)};
  }
  const std::string instance = policy.instance_of(identity);
  if (instance.empty()) {
    return refused(api::kErrPolicyDenied, "instance has no instance id to approve",
                   str_cat("policy ", named.name, " needs approval, and the evidence names no instance (",
                           identity.summary(), ")"));
  }
  auto asked = json_optional_string(request, api::field::kApprovalRequest, 64);
  if (!asked.is_ok()) return bad_request(asked.status().message());
  if (!asked->empty() && !is_approval_id(asked.value())) {
    return bad_request(str_cat("field '", api::field::kApprovalRequest, "' is not a request id"));
  }
  const int64_t now = clock_.now_unix();
  Result<std::optional<ApprovalRecord>> found = std::optional<ApprovalRecord>();
  if (!asked->empty()) {
    auto one = store_.get_approval(asked.value());
    if (one.is_ok()) {
      found = std::optional<ApprovalRecord>(std::move(one).value());
    } else if (one.status().kind() == ErrorKind::kNotFound) {
      return refused(api::kErrApprovalDenied, "no such approval request",
                     str_cat("approval request ", asked.value(), " is unknown (", identity.summary(), ")"));
    } else {
      found = one.status();
    }
  } else {
    found = store_.find_pending_approval(call.volume_id, instance);
  }
  if (!found.is_ok()) return store_error("approval requests unavailable", found.status());
  Gate gate;
  if (found->has_value()) {
    auto current = Approval::from_record(**found);
    if (!current.is_ok()) return store_error("approval request unreadable", current.status());
    Approval& a = current.value();
    if (a.volume_id != call.volume_id || a.instance != instance) {
      return refused(api::kErrApprovalDenied, "the approval request is another instance's",
                     str_cat("approval request ", a.id, " is for volume ", a.volume_id, " and instance ",
                             a.instance, ", not this one (", identity.summary(), ")"));
    }
    const std::string state = a.state_at(now);
    // A request for another PCR change than this quote shows (the PCRs
    // moved again, or were allowed meanwhile) is not this one's.
    if (a.pcr_changes == changes) {
      if (state == "approved") {
        gate.grant = std::move(a);
        return gate;
      }
      if (state == "pending") {
        gate.wait = waiting(a);
        return gate;
      }
      if (state == "denied") {
        return refused(api::kErrApprovalDenied, "the release was denied by an approver",
                       str_cat("approval request ", a.id, " denied by ", a.denial ? a.denial->name : "-", ": ",
                               a.denial ? a.denial->reason : "", " (", identity.summary(), ")"));
      }
      if (state == "expired") {
        if (a.state == "pending") {
          Approval expired = a;
          expired.state = "expired";
          const AuditEvent event{now, "approval.expire", "denied", a.volume_id, call.peer,
                                 str_cat(a.id, ": not decided within its time (", a.approvals.size(), " of ",
                                         a.needed, " approvals)")};
          Status s = store_.update_approval(a.to_record(), expired.to_record(), event);
          log_audit(event, s);
          if (s.is_ok() && options_.operations != nullptr) options_.operations->approval_expired(a, now);
        }
        // Asked about by its id: the instance's wait ends, denied. Found as
        // the newest pending one: a later boot, which asks afresh.
        if (!asked->empty()) {
          return refused(api::kErrApprovalDenied, "the approval request expired undecided",
                         str_cat("approval request ", a.id, " expired undecided (", identity.summary(), ")"));
        }
      }
    }
    // "used" (a release whose answer was lost, or an earlier boot): a new request.
  }
  Approval a;
  a.id = new_approval_id();
  a.volume_id = call.volume_id;
  a.instance = instance;
  a.policy = named.name;
  a.mode = named.approval;
  a.platform = identity.platform;
  a.claims = identity.claims;
  a.issued_by = policy.issued_by;
  if (auto set = options_.policies != nullptr ? options_.policies->current() : nullptr) a.policy_by = set->loaded_by;
  a.needed = named.approvers;
  if (!changes.empty()) {
    a.pcr_bank = policy.tpm->bank;
    a.pcr_changes = changes;
    if (a.mode == "automatic") a.mode = "pcr-change";
  }
  a.created_at = now;
  a.expires_at = now + named.approval_timeout;
  const AuditEvent event{now, "approval.request", "pending", a.volume_id, call.peer,
                         str_cat(a.id, ": ", identity.summary(), " under policy ", named.name, " (", a.mode,
                                 "), ", a.needed, " approval(s) needed within ", named.approval_timeout, " s",
                                 pcrs != nullptr ? "; PCR values not accepted: " + pcrs->describe_mismatch() : "")};
  Status s = store_.insert_approval(a.to_record(), event);
  log_audit(event, s);
  if (!s.is_ok()) return unaudited(call);  // no request without its record
  if (options_.operations != nullptr) options_.operations->approval_requested(a, now);
  gate.wait = waiting(a);
  return gate;
}

std::optional<Refusal> KeyService::spend_approval(const Call& call, const Approval& granted,
                                                  const Identity& identity, const CountedRelease* counted) {
  Approval used = granted;
  used.state = "used";
  std::string by;
  for (const auto& d : granted.approvals) by += (by.empty() ? "" : ", ") + d.name;
  const AuditEvent event{clock_.now_unix(), call.event, "released", call.volume_id, call.peer,
                         str_cat(identity.summary(), ", approved by ", by, " (", granted.id, ")")};
  Status s = store_.update_approval(granted.to_record(), used.to_record(), event, counted);
  if (s.kind() == ErrorKind::kRefused) {  // the period's releases are used up; the approval stays
    return refused(api::kErrPolicyDenied, "this instance's releases for the period are used up",
                   str_cat(s.message(), " (", identity.summary(), ")"));
  }
  log_audit(event, s);
  if (s.is_ok()) return std::nullopt;
  if (s.kind() == ErrorKind::kConflict) {
    // Another release took it first: this instance asks again.
    return refused(api::kErrApprovalDenied, "the approval was used by another release",
                   str_cat("approval request ", granted.id, " was used meanwhile (", identity.summary(), ")"));
  }
  return unaudited(call);
}

void KeyService::remember_instance(const VolumeRecord& record, const Identity& identity) {
  // A compare-and-swap on the policy, tried again when another change came
  // between; should it fail, the instance's next boot asks again.
  std::string expected = record.policy_json;
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto parsed = parse_json_object(expected);
    if (!parsed.is_ok()) break;
    auto policy = VolumePolicy::from_json(parsed.value());
    if (!policy.is_ok()) break;
    const std::string instance = policy->instance_of(identity);
    if (instance.empty() || policy->known_instances.count(instance) != 0) return;
    if (policy->known_instances.size() >= kMaxRevokedInstances) {
      log_warning(str_cat("volume ", record.id, ": ", kMaxRevokedInstances,
                          " instances known already; ", instance, " will ask for approval at each boot"));
      return;
    }
    policy->known_instances.insert(instance);
    const std::string updated = to_json(policy->to_json());
    Status s = store_.update_volume_policy(record.id, expected, updated, clock_.now_unix());
    if (s.is_ok()) return;
    if (s.kind() != ErrorKind::kConflict) {
      log_warning(str_cat("volume ", record.id, ": could not remember instance ", instance, ": ", s.message()));
      return;
    }
    auto fresh = store_.get_volume(record.id);
    if (!fresh.is_ok()) break;
    expected = fresh->policy_json;
  }
  log_warning(str_cat("volume ", record.id, ": could not remember the approved instance; it asks again next boot"));
}

void KeyService::allow_approved_pcrs(const Call& call, const VolumeRecord& record, const Approval& granted) {
  std::string expected = record.policy_json;
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto parsed = parse_json_object(expected);
    auto policy = parsed.is_ok() ? VolumePolicy::from_json(parsed.value()) : Result<VolumePolicy>(parsed.status());
    if (!policy.is_ok() || !policy->tpm) break;
    std::string detail;
    for (const auto& [pcr, change] : granted.pcr_changes) {
      auto it = policy->tpm->pcrs.find(pcr);
      if (it == policy->tpm->pcrs.end()) continue;
      if (std::find(it->second.begin(), it->second.end(), change.quoted) == it->second.end()) {
        if (it->second.size() >= kMaxAcceptedPcrValues) it->second.erase(it->second.begin() + 1);  // the baseline stays
        it->second.push_back(change.quoted);
      }
      detail += str_cat(detail.empty() ? "" : ", ", "PCR ", pcr, "=", hex_encode(change.quoted));
    }
    const std::string updated = to_json(policy->to_json());
    const int64_t now = clock_.now_unix();
    Status s = store_.update_volume_policy(record.id, expected, updated, now);
    if (s.is_ok()) {
      Call allowed{"tpm.pcr_allow", call.peer, record.id};
      (void)write_audit(allowed, "ok", str_cat("allowed ", detail, " (approved in ", granted.id, ")"));
      return;
    }
    if (s.kind() != ErrorKind::kConflict) break;
    auto fresh = store_.get_volume(record.id);
    if (!fresh.is_ok()) break;
    expected = fresh->policy_json;
  }
  log_warning(str_cat("volume ", record.id, ": the PCR values approved in ", granted.id,
                      " could not be added; the next boot with them asks again"));
}

Checked<EnrollmentTemplate> KeyService::enrollment_template(const std::string& token,
                                                            const std::optional<Identity>& identity,
                                                            std::string* how,
                                                            std::optional<Bytes>* token_hash) {
  if (token.empty()) {
    if (!identity) {
      return refused(api::kErrTokenInvalid, "no enrollment token and no evidence",
                     "no enrollment token and no evidence");
    }
    auto rule = match_enrollment_rule(options_.attestation_enrollment, *identity);
    if (!rule) {
      const char* why = "no enrollment token, and no attestation-enrollment rule admits this instance";
      return refused(api::kErrTokenInvalid, why, str_cat(why, " (", identity->summary(), ")"));
    }
    *how = str_cat("attestation (rule ", *rule + 1, ")");
    return options_.attestation_enrollment[*rule];
  }
  *how = "token";
  // Spent only when the enrollment is recorded (record_enrollment).
  *token_hash = sha256(token);
  auto tmpl_json = store_.peek_enrollment_token(**token_hash, clock_.now_unix());
  if (!tmpl_json.is_ok()) {
    return refusal_for(tmpl_json.status(), api::kErrTokenInvalid, tmpl_json.status().message());
  }
  auto tmpl_obj = parse_json_object(tmpl_json.value());
  if (!tmpl_obj.is_ok()) return server_error("token template unreadable", tmpl_obj.status().message());
  auto tmpl = EnrollmentTemplate::from_json(tmpl_obj.value());
  if (!tmpl.is_ok()) return server_error("token template unreadable", tmpl.status().message());
  return std::move(tmpl).value();
}

ApiResponse KeyService::enroll_register(std::string_view body, const std::string& peer) {
  return serve("enroll.register", body, peer, &KeyService::serve_register);
}

Checked<ApiResponse> KeyService::serve_register(Call& call, std::string_view body) {
  // Registrations are what make pending volumes: they sweep the stale ones.
  int64_t swept = last_expiry_.load();
  const int64_t arrived = clock_.now_unix();
  if (arrived - swept >= 60 && last_expiry_.compare_exchange_strong(swept, arrived)) {
    (void)expire_pending_volumes();
  }
  auto request = parse_request(body);
  if (!request.ok()) return request.refusal();
  // Before enrollment there is no volume id: the binding covers "".
  auto attested = parse_attested(request.value(), "");
  if (!attested.ok()) return attested.refusal();
  // No token: enrollment by attestation, if a configured rule admits the
  // instance's verified identity.
  auto token = json_optional_string(request.value(), api::field::kEnrollmentToken,
                                    api::kMaxEnrollmentTokenLength);
  auto evidence = json_object(request.value(), api::field::kEvidence, false);
  auto description = json_optional_text(request.value(), api::field::kDescription,
                                        api::kMaxDescriptionLength);
  for (const Status* s : {&token.status(), &evidence.status(), &description.status()}) {
    if (!s->is_ok()) return bad_request(s->message());
  }
  if (auto spent = spend_nonce(attested->nonce)) return *spent;
  // Evidence is verified before a use of the token is spent.
  std::optional<Identity> identity;
  if (!evidence->isNull()) {
    auto verified = evidence_.verify_identity(evidence.value(), attested->binding);
    if (!verified.is_ok()) {
      return refused(api::kErrEvidenceInvalid, "instance evidence did not verify",
                     verified.status().message());
    }
    identity = std::move(verified).value();
    if (auto r = limit_instance(*identity)) return *r;
  }
  std::optional<TpmPolicy> tpm_policy;
  if (request->isMember(api::field::kTpm)) {
    auto t = tpm_policy_for_enrollment(request.value()[api::field::kTpm], attested->binding);
    if (!t.is_ok()) return refusal_for(t.status(), api::kErrEvidenceInvalid, "TPM quote did not verify");
    tpm_policy = std::move(t).value();
  }
  std::string how;
  std::optional<Bytes> token_hash;
  auto tmpl = enrollment_template(token.value(), identity, &how, &token_hash);
  if (!tmpl.ok()) return tmpl.refusal();
  auto policy = policy_for_enrollment(tmpl.value(), identity ? &*identity : nullptr);
  if (!policy.is_ok()) {
    return refusal_for(policy.status(), api::kErrPolicyDenied, policy.status().message());
  }
  // A token that names a policy enrolls only an instance the policy admits
  // now: enrollment hands out a secret as an unlock does. (Offline, with no
  // evidence, there is no instance yet: each unlock is checked.)
  if (!policy->named_policy.empty() && identity) {
    auto named = check_named_policy(policy->named_policy, *identity);
    if (!named.is_ok()) {
      return refused(api::kErrPolicyDenied, "instance does not satisfy the token's policy",
                     str_cat(named.status().message(), " (", identity->summary(), ")"));
    }
  }
  policy->tpm = tpm_policy;
  auto replaced = replaced_volume(request.value(), attested->nonce, policy.value(), tmpl.value());
  if (!replaced.ok()) return replaced.refusal();
  policy->rotates = replaced.value();
  call.volume_id = new_volume_id();
  auto secret = SecretBuffer::random(api::kVolumeSecretSize);
  if (!secret.is_ok()) return server_error("no randomness", secret.status().message());
  auto sealed = seal_volume_secret(kek_, secret.value(), call.volume_id);
  if (!sealed.is_ok()) return server_error("could not seal secret", sealed.status().message());
  auto wrapped = wrap_secret_for_client(secret.value(), attested->client_public_key, call.volume_id,
                                        attested->nonce);
  if (!wrapped.is_ok()) return bad_request("client public key unusable");
  const int64_t now = clock_.now_unix();
  VolumeRecord record{call.volume_id, VolumeState::kPending, to_json(policy->to_json()),
                      std::move(sealed).value(), description.value(), now, now};
  const std::string who = identity ? identity->summary() : std::string("no evidence");
  // The token's use, the pending volume and its audit record: one
  // transaction, so a crash or a failure leaves all three or none.
  const AuditEvent event{
      now,
      call.event,
      "ok",
      call.volume_id,
      call.peer,
      str_cat(who, ", by ", how,
              policy->rotates.empty() ? "" : ", replacing volume " + policy->rotates)};
  Status recorded = store_.record_enrollment(token_hash ? &*token_hash : nullptr, now, record, event);
  log_audit(event, recorded);
  if (recorded.kind() == ErrorKind::kRefused) {  // the token's last use went to another request
    return refused(api::kErrTokenInvalid, recorded.message(), recorded.message());
  }
  if (!recorded.is_ok()) return unaudited(call);  // nothing stored, nothing released
  ApiResponse r;
  r.body[api::field::kVolumeId] = call.volume_id;
  r.body[api::field::kWrapped] = wrapped->to_json();
  r.body[api::field::kPolicy] = policy->to_json();
  return r;
}

ApiResponse KeyService::enroll_confirm(std::string_view body, const std::string& peer) {
  return serve("enroll.confirm", body, peer, &KeyService::serve_confirm);
}

Checked<VolumeRecord> KeyService::load_proven_volume(Call& call, std::string_view body,
                                                     ProofOf expected, const char* what) {
  auto request = parse_volume_request(call, body);
  if (!request.ok()) return request.refusal();
  auto proof = decode_fixed(request.value(), api::field::kProof, kSha256Size);
  if (!proof.ok()) return proof.refusal();
  auto record = load_volume(call.volume_id);
  if (!record.ok()) return record.refusal();
  auto secret = open_volume_secret(kek_, record->sealed_secret, call.volume_id);
  if (!secret.is_ok()) return server_error("volume secret unavailable", secret.status().message());
  if (!constant_time_equal(expected(secret.value(), call.volume_id), proof.value())) {
    const std::string why = str_cat(what, " proof does not match");
    return refused(api::kErrPolicyDenied, why, why);
  }
  return record;
}

Checked<ApiResponse> KeyService::serve_confirm(Call& call, std::string_view body) {
  auto record = load_proven_volume(call, body, &api::enrollment_confirmation, "confirmation");
  if (!record.ok()) return record.refusal();
  if (record->state == VolumeState::kRevoked) {
    return refused(api::kErrRevoked, "volume has been revoked", "volume revoked");
  }
  if (record->state == VolumeState::kPending &&
      record->created_at < clock_.now_unix() - options_.pending_ttl_seconds) {
    (void)expire_pending_volumes();
    return refused(api::kErrRevoked, "enrollment expired: not confirmed in time",
                   str_cat("confirm after the pending volume expired (", options_.pending_ttl_seconds,
                           " s)"));
  }
  if (record->state == VolumeState::kPending) {
    Status s = store_.transition_volume(call.volume_id, VolumeState::kPending, VolumeState::kActive,
                                        clock_.now_unix());
    // A confirmation that raced another one finds the volume active: fine.
    if (!s.is_ok() && s.kind() != ErrorKind::kConflict) return store_error("could not confirm", s);
  }
  (void)write_audit(call, "ok", "");
  if (auto retired = retire_rotated_volume(call, record.value())) return *retired;
  ApiResponse r;
  r.body[api::field::kVolumeId] = call.volume_id;
  r.body[api::field::kState] = "active";
  return r;
}

Checked<std::string> KeyService::replaced_volume(const Json::Value& request, const Bytes& nonce,
                                                 const VolumePolicy& policy,
                                                 const EnrollmentTemplate& tmpl) {
  if (!request.isMember(api::field::kRotates)) return tmpl.rotates;
  auto old_id = json_string(request, api::field::kRotates, 64);
  if (!old_id.is_ok() || !api::is_valid_volume_id(old_id.value()))
    return bad_request("rotates: not a volume id");
  auto proof = decode_fixed(request, api::field::kRotatesProof, kSha256Size);
  if (!proof.ok()) return proof.refusal();
  if (!tmpl.rotates.empty() && tmpl.rotates != old_id.value()) {
    return refused(api::kErrTokenInvalid, "this token rotates another volume",
                   str_cat("token rotates volume ", tmpl.rotates, ", not ", old_id.value()));
  }
  auto old_record = load_volume(old_id.value());
  if (!old_record.ok()) return old_record.refusal();
  if (old_record->state != VolumeState::kActive) {
    return refused(api::kErrRevoked, "the volume to replace is not active",
                   str_cat("rotation of volume ", old_id.value(), ", which is ",
                           volume_state_name(old_record->state)));
  }
  auto old_secret = open_volume_secret(kek_, old_record->sealed_secret, old_id.value());
  if (!old_secret.is_ok())
    return server_error("volume secret unavailable", old_secret.status().message());
  if (!constant_time_equal(api::rotation_proof(old_secret.value(), old_id.value(), nonce),
                           proof.value())) {
    return refused(api::kErrPolicyDenied, "rotation proof does not match",
                   str_cat("rotation proof for volume ", old_id.value(), " does not match"));
  }
  auto old_policy = stored_policy(old_record.value());
  if (!old_policy.ok()) return old_policy.refusal();
  // An image group's volume stays: the group's other instances open it.
  if (old_policy->is_image_group()) return tmpl.rotates;
  if (!policy.binds_same_instance_as(old_policy.value())) {
    return refused(api::kErrPolicyDenied, "the volume to replace is another instance's",
                   str_cat("rotation of volume ", old_id.value(), ", bound to another instance"));
  }
  return old_id.value();
}

std::optional<Refusal> KeyService::retire_rotated_volume(const Call& call,
                                                         const VolumeRecord& confirmed) {
  auto policy = stored_policy(confirmed);
  if (!policy.ok()) return policy.refusal();
  const std::string& old_id = policy->rotates;
  if (old_id.empty()) return std::nullopt;
  auto old_record = store_.get_volume(old_id);
  if (!old_record.is_ok()) {
    return server_error("rotation not completed",
                        str_cat("volume ", old_id, ": ", old_record.status().message()));
  }
  if (old_record->state == VolumeState::kRevoked) return std::nullopt;  // a confirm asked again
  auto old_policy = stored_policy(old_record.value());
  if (!old_policy.ok()) return old_policy.refusal();
  // The rotation token bound the old volume's instance; a mismatch here is
  // a store edited by hand, and nothing is revoked on its word.
  if (!policy->binds_same_instance_as(old_policy.value())) {
    return server_error("rotation not completed",
                        str_cat("volume ", old_id, " is not this instance's"));
  }
  // The new keyslot opens (the client checked before it confirmed): from
  // now on only the new secret is released, and the old one, in every copy
  // of the volume made before, is refused.
  const AuditEvent event{clock_.now_unix(), "rotate", "ok", old_id, call.peer,
                         str_cat("replaced by volume ", call.volume_id, ": revoked")};
  Status s = store_.revoke_volume(old_id, old_record->state, clock_.now_unix(), event);
  if (s.kind() == ErrorKind::kConflict) return std::nullopt;  // revoked meanwhile
  log_audit(event, s);
  if (!s.is_ok()) {
    return server_error("rotation not completed",
                        str_cat("revoking volume ", old_id, ": ", s.message()));
  }
  return std::nullopt;
}

Result<size_t> KeyService::expire_pending_volumes() {
  const int64_t now = clock_.now_unix();
  last_expiry_ = now;
  const AuditEvent event{now, "enroll.expire", "ok", "", "local",
                         str_cat("not confirmed within ", options_.pending_ttl_seconds,
                                 " s of its registration: revoked")};
  auto expired = store_.expire_pending(now - options_.pending_ttl_seconds, now, event);
  if (!expired.is_ok()) {
    log_error(str_cat("expiring pending volumes: ", expired.status().message()));
    return expired.status();
  }
  for (const std::string& id : expired.value()) {
    AuditEvent e = event;
    e.volume_id = id;
    log_audit(e, Status::ok());
  }
  return expired->size();
}

ApiResponse KeyService::enroll_abandon(std::string_view body, const std::string& peer) {
  return serve("enroll.abandon", body, peer, &KeyService::serve_abandon);
}

Checked<ApiResponse> KeyService::serve_abandon(Call& call, std::string_view body) {
  auto record = load_proven_volume(call, body, &api::enrollment_abandonment, "abandonment");
  if (!record.ok()) return record.refusal();
  // Confirmed (a confirm whose answer was lost): others may unlock it by
  // now, so a client does not get to revoke it; an administrator does.
  auto still_active = [] {
    Refusal r = refused(api::kErrVolumeActive,
                        "volume is active; an administrator revokes it "
                        "(keygate-server volumes revoke)",
                        "abandon refused: volume is active (its enrolling client removed its keyslot)");
    r.http_status = 409;
    return r;
  };
  if (record->state == VolumeState::kActive) return still_active();
  if (record->state == VolumeState::kPending) {
    Status s = store_.transition_volume(call.volume_id, VolumeState::kPending, VolumeState::kRevoked,
                                        clock_.now_unix());
    // A confirm that came first made it active.
    if (s.kind() == ErrorKind::kConflict) return still_active();
    if (!s.is_ok()) return store_error("could not abandon", s);
  }
  (void)write_audit(call, "ok", "abandoned by its enrolling client: keyslot removed, volume revoked");
  ApiResponse r;
  r.body[api::field::kVolumeId] = call.volume_id;
  r.body[api::field::kState] = "revoked";
  return r;
}

}  // namespace keygate::server
