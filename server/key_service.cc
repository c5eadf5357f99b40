#include "server/key_service.h"

#include "core/crypto.h"
#include "core/envelope.h"
#include "core/json.h"
#include "core/log.h"
#include "core/protocol.h"
#include "server/tpm_policy.h"

namespace keygate::server {
namespace {

std::string store_aad(const std::string& volume_id) { return "keygate-v1 store " + volume_id; }

Result<Bytes> decode_fixed(const Json::Value& obj, const char* key, size_t size) {
  auto text = json_string(obj, key, size * 2 + 8);
  if (!text.is_ok()) return text.status();
  auto bytes = base64_decode(text.value());
  if (!bytes.is_ok() || bytes->size() != size) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("field '", key, "' must be base64 of ", size, " bytes"));
  }
  return bytes;
}

}  // namespace

ApiResponse error_response(int status, const char* code, std::string message) {
  ApiResponse r;
  r.status = status;
  r.body["error"]["code"] = code;
  r.body["error"]["message"] = std::move(message);
  return r;
}

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
                                            int64_t now, int64_t ttl_seconds, int uses) {
  if (ttl_seconds <= 0 || uses <= 0) {
    return Status::error(ErrorKind::kInvalidArgument, "token lifetime and uses must be positive");
  }
  Bytes raw = random_bytes(24);
  std::string token = "kgt_" + base64url_encode(raw.data(), raw.size());
  KEYGATE_RETURN_IF_ERROR(
      store.create_enrollment_token(sha256(token), to_json(tmpl.to_json()), now + ttl_seconds, uses));
  return token;
}

struct KeyService::Common {
  Bytes nonce;
  Bytes client_public_key;
};

KeyService::KeyService(Store& store, SecretBuffer kek, EvidenceTrust& trust, const Clock& clock,
                       ServiceOptions options)
    : store_(store), kek_(std::move(kek)), evidence_(trust, clock), clock_(clock),
      options_(options) {}

Status KeyService::write_audit(const std::string& event, const std::string& outcome,
                               const std::string& volume_id, const std::string& peer,
                               const std::string& detail) {
  std::string line = str_cat(event, " ", outcome, " volume=", volume_id.empty() ? "-" : volume_id,
                             " peer=", peer, detail.empty() ? "" : " detail=", detail);
  Status s = store_.append_audit(AuditEvent{clock_.now_unix(), event, outcome, volume_id, peer,
                                            detail});
  if (!s.is_ok()) {
    log_error(str_cat("audit write failed (", line, "): ", s.message()));
  } else if (outcome == "refused" || outcome == "error") {
    log_warning(line);
  } else {
    log_info(line);
  }
  return s;
}

void KeyService::audit(const std::string& event, const std::string& outcome,
                       const std::string& volume_id, const std::string& peer,
                       const std::string& detail) {
  (void)write_audit(event, outcome, volume_id, peer, detail);  // failures are logged
}

// A secret leaves the server only once its release is in the audit log.
ApiResponse KeyService::unaudited(const char* event, const std::string& volume_id) {
  log_error(str_cat(event, " volume=", volume_id, ": not sent, the audit log cannot be written"));
  return error_response(503, "audit_unavailable",
                        "the audit log cannot be written; no key is released until it can");
}

Result<Json::Value> KeyService::parse_request(const char* event, std::string_view body,
                                              const std::string& peer) {
  auto request = parse_json_object(body, api::kMaxRequestBody);
  if (!request.is_ok()) audit(event, "refused", "", peer, request.status().message());
  return request;
}

ApiResponse KeyService::challenge(const std::string& peer) {
  Bytes nonce = random_bytes(api::kNonceSize);
  const int64_t now = clock_.now_unix();
  Status s = store_.put_nonce(nonce, now, now + options_.nonce_ttl_seconds);
  if (!s.is_ok()) {
    log_error(str_cat("challenge for ", peer, ": ", s.message()));
    if (s.kind() == ErrorKind::kUnavailable) {
      return error_response(503, "busy", "too many outstanding challenges; retry");
    }
    return error_response(500, api::kErrInternal, "could not record challenge");
  }
  ApiResponse r;
  r.body["nonce"] = base64_encode(nonce);
  r.body["expires_in"] = options_.nonce_ttl_seconds;
  return r;
}

Result<KeyService::Common> KeyService::parse_common(const Json::Value& request) {
  Common c;
  auto nonce = decode_fixed(request, "nonce", api::kNonceSize);
  if (!nonce.is_ok()) return nonce.status();
  auto pub = decode_fixed(request, "client_public_key", kX25519KeySize);
  if (!pub.is_ok()) return pub.status();
  c.nonce = std::move(nonce).value();
  c.client_public_key = std::move(pub).value();
  return c;
}

Result<Identity> KeyService::verify_evidence(const Json::Value& evidence, const Common& common,
                                             const std::string& volume_id) {
  const Bytes binding = binding_value(common.nonce, common.client_public_key, volume_id);
  return evidence_.verify(evidence, binding);
}

bool KeyService::check_tpm(const char* event, const std::string& vid, const std::string& peer,
                           const std::string& stored_policy, const VolumePolicy& policy,
                           const Json::Value& request, const Common& common, ApiResponse* refusal) {
  const Bytes binding = binding_value(common.nonce, common.client_public_key, vid);
  if (!request.isMember("tpm")) {
    audit(event, "refused", vid, peer, "no TPM quote; the volume's policy requires one");
    *refusal = error_response(403, api::kErrTpmRequired, "this volume's policy requires a TPM quote");
    return false;
  }
  auto checked = check_tpm_evidence(*policy.tpm, request["tpm"], binding);
  if (!checked.is_ok()) {
    audit(event, "refused", vid, peer, checked.status().message());
    const int code = checked.status().kind() == ErrorKind::kInvalidArgument ? 400 : 403;
    *refusal = error_response(code, code == 400 ? api::kErrBadRequest : api::kErrEvidenceInvalid,
                              code == 400 ? checked.status().message() : "TPM quote did not verify");
    return false;
  }
  if (checked->mismatched.empty()) return true;
  const int64_t now = clock_.now_unix();
  if (policy.tpm->accept_next_until == 0 || now > policy.tpm->accept_next_until) {
    audit(event, "refused", vid, peer, "PCR values not accepted: " + checked->describe_mismatch());
    *refusal = error_response(403, api::kErrPolicyDenied, "the TPM's PCR values are not accepted");
    return false;
  }
  // Accept-next: this boot's values become the baseline, once.
  VolumePolicy updated = policy;
  updated.tpm->accept_next_until = 0;
  updated.tpm->pcrs.clear();
  for (const auto& [pcr, value] : checked->values) updated.tpm->pcrs[pcr] = {value};
  Status s = store_.update_volume_policy(vid, stored_policy, to_json(updated.to_json()), now);
  if (!s.is_ok()) {
    audit(event, s.kind() == ErrorKind::kConflict ? "refused" : "error", vid, peer,
          "accept-next not applied: " + s.message());
    *refusal = s.kind() == ErrorKind::kConflict
                   ? error_response(403, api::kErrPolicyDenied, "the volume's policy changed; retry")
                   : error_response(500, api::kErrInternal, "store unavailable");
    return false;
  }
  audit("tpm.accept_next", "ok", vid, peer, "new PCR baseline: " + checked->describe_mismatch());
  return true;
}

ApiResponse KeyService::unlock(std::string_view body, const std::string& peer) {
  const char* kEvent = "unlock";
  auto request = parse_request(kEvent, body, peer);
  if (!request.is_ok()) return error_response(400, api::kErrBadRequest, request.status().message());
  auto volume_id = json_string(request.value(), "volume_id", api::kMaxVolumeIdLength);
  if (!volume_id.is_ok() || !api::is_valid_volume_id(volume_id.value())) {
    audit(kEvent, "refused", "", peer, "bad volume_id");
    return error_response(400, api::kErrBadRequest, "field 'volume_id' missing or malformed");
  }
  const std::string& vid = volume_id.value();
  auto common = parse_common(request.value());
  if (!common.is_ok()) {
    audit(kEvent, "refused", vid, peer, common.status().message());
    return error_response(400, api::kErrBadRequest, common.status().message());
  }
  auto evidence = json_object(request.value(), "evidence", true);
  if (!evidence.is_ok()) {
    audit(kEvent, "refused", vid, peer, evidence.status().message());
    return error_response(400, api::kErrBadRequest, evidence.status().message());
  }
  // The nonce is spent by this request whatever its outcome.
  auto fresh = store_.consume_nonce(common->nonce, clock_.now_unix());
  if (!fresh.is_ok()) {
    audit(kEvent, "error", vid, peer, fresh.status().message());
    return error_response(500, api::kErrInternal, "store unavailable");
  }
  if (!fresh.value()) {
    audit(kEvent, "refused", vid, peer, "nonce unknown, reused or expired");
    return error_response(403, api::kErrNonceInvalid, "challenge nonce unknown, reused or expired");
  }
  auto record = store_.get_volume(vid);
  if (!record.is_ok()) {
    if (record.status().kind() == ErrorKind::kNotFound) {
      audit(kEvent, "refused", vid, peer, "unknown volume");
      return error_response(403, api::kErrPolicyDenied, "not authorised for this volume");
    }
    audit(kEvent, "error", vid, peer, record.status().message());
    return error_response(500, api::kErrInternal, "store unavailable");
  }
  if (record->state == VolumeState::kRevoked) {
    audit(kEvent, "refused", vid, peer, "volume revoked");
    return error_response(403, api::kErrRevoked, "volume has been revoked");
  }
  if (record->state != VolumeState::kActive) {
    audit(kEvent, "refused", vid, peer, "enrollment not confirmed");
    return error_response(403, api::kErrNotEnrolled, "volume enrollment was never confirmed");
  }
  auto identity = verify_evidence(evidence.value(), common.value(), vid);
  if (!identity.is_ok()) {
    audit(kEvent, "refused", vid, peer, identity.status().message());
    return error_response(403, api::kErrEvidenceInvalid, "instance evidence did not verify");
  }
  auto policy_json = parse_json_object(record->policy_json);
  if (!policy_json.is_ok()) {
    audit(kEvent, "error", vid, peer, "stored policy unreadable");
    return error_response(500, api::kErrInternal, "stored policy unreadable");
  }
  auto policy = VolumePolicy::from_json(policy_json.value());
  if (!policy.is_ok()) {
    audit(kEvent, "error", vid, peer, policy.status().message());
    return error_response(500, api::kErrInternal, "stored policy unreadable");
  }
  Status allowed = evaluate_policy(policy.value(), identity.value());
  if (!allowed.is_ok()) {
    audit(kEvent, "refused", vid, peer,
          str_cat(allowed.message(), " (", identity->summary(), ")"));
    return error_response(403, api::kErrPolicyDenied, "instance does not satisfy the volume's policy");
  }
  if (policy->tpm) {
    ApiResponse refusal;
    if (!check_tpm(kEvent, vid, peer, record->policy_json, policy.value(), request.value(),
                   common.value(), &refusal)) {
      return refusal;
    }
  }
  auto secret = open_volume_secret(kek_, record->sealed_secret, vid);
  if (!secret.is_ok()) {
    audit(kEvent, "error", vid, peer, secret.status().message());
    return error_response(500, api::kErrInternal, "volume secret unavailable");
  }
  auto wrapped = wrap_secret_for_client(secret.value(), common->client_public_key, vid,
                                        common->nonce);
  if (!wrapped.is_ok()) {
    audit(kEvent, "refused", vid, peer, wrapped.status().message());
    return error_response(400, api::kErrBadRequest, "client public key unusable");
  }
  if (!write_audit(kEvent, "released", vid, peer, identity->summary()).is_ok()) {
    return unaudited(kEvent, vid);
  }
  ApiResponse r;
  r.body["volume_id"] = vid;
  r.body["wrapped"] = wrapped->to_json();
  return r;
}

ApiResponse KeyService::enroll_register(std::string_view body, const std::string& peer) {
  const char* kEvent = "enroll.register";
  auto request = parse_request(kEvent, body, peer);
  if (!request.is_ok()) return error_response(400, api::kErrBadRequest, request.status().message());
  auto common = parse_common(request.value());
  // No token: enrollment by attestation, if a configured rule admits the
  // instance's verified identity.
  auto token = json_optional_string(request.value(), "enrollment_token",
                                    api::kMaxEnrollmentTokenLength);
  auto evidence = json_object(request.value(), "evidence", false);
  auto description = json_optional_string(request.value(), "description", 256);
  for (const Status* s :
       {&common.status(), &token.status(), &evidence.status(), &description.status()}) {
    if (!s->is_ok()) {
      audit(kEvent, "refused", "", peer, s->message());
      return error_response(400, api::kErrBadRequest, s->message());
    }
  }
  auto fresh = store_.consume_nonce(common->nonce, clock_.now_unix());
  if (!fresh.is_ok()) {
    audit(kEvent, "error", "", peer, fresh.status().message());
    return error_response(500, api::kErrInternal, "store unavailable");
  }
  if (!fresh.value()) {
    audit(kEvent, "refused", "", peer, "nonce unknown, reused or expired");
    return error_response(403, api::kErrNonceInvalid, "challenge nonce unknown, reused or expired");
  }
  // Verify evidence before spending a use of the token.
  std::optional<Identity> identity;
  if (!evidence->isNull()) {
    // Before enrollment there is no volume id: the binding covers "".
    auto verified = verify_evidence(evidence.value(), common.value(), "");
    if (!verified.is_ok()) {
      audit(kEvent, "refused", "", peer, verified.status().message());
      return error_response(403, api::kErrEvidenceInvalid, "instance evidence did not verify");
    }
    identity = std::move(verified).value();
  }
  std::optional<TpmPolicy> tpm_policy;
  if (request->isMember("tpm")) {
    auto t = tpm_policy_for_enrollment(request.value()["tpm"],
                                       binding_value(common->nonce, common->client_public_key, ""));
    if (!t.is_ok()) {
      audit(kEvent, "refused", "", peer, t.status().message());
      const bool malformed = t.status().kind() == ErrorKind::kInvalidArgument;
      return error_response(malformed ? 400 : 403,
                            malformed ? api::kErrBadRequest : api::kErrEvidenceInvalid,
                            malformed ? t.status().message() : "TPM quote did not verify");
    }
    tpm_policy = std::move(t).value();
  }
  Result<EnrollmentTemplate> tmpl = Status::error(ErrorKind::kInternal, "no template");
  std::string how = "token";
  if (token->empty()) {
    const EnrollmentTemplate* rule = nullptr;
    for (size_t i = 0; identity && i < options_.attestation_enrollment.size() && !rule; ++i) {
      const EnrollmentTemplate& r = options_.attestation_enrollment[i];
      if (r.platform != identity->platform) continue;
      bool all = true;
      for (const auto& [claim, value] : r.require) all = all && identity->claim(claim) == value;
      if (all) {
        rule = &r;
        how = str_cat("attestation (rule ", i + 1, ")");
      }
    }
    if (rule == nullptr) {
      const char* why = identity ? "no enrollment token, and no attestation-enrollment rule admits this instance"
                                 : "no enrollment token and no evidence";
      audit(kEvent, "refused", "", peer, identity ? str_cat(why, " (", identity->summary(), ")") : why);
      return error_response(403, api::kErrTokenInvalid, why);
    }
    tmpl = *rule;
  } else {
    auto tmpl_json = store_.consume_enrollment_token(sha256(token.value()), clock_.now_unix());
    if (!tmpl_json.is_ok()) {
      if (tmpl_json.status().kind() == ErrorKind::kRefused) {
        audit(kEvent, "refused", "", peer, tmpl_json.status().message());
        return error_response(403, api::kErrTokenInvalid, tmpl_json.status().message());
      }
      audit(kEvent, "error", "", peer, tmpl_json.status().message());
      return error_response(500, api::kErrInternal, "store unavailable");
    }
    auto tmpl_obj = parse_json_object(tmpl_json.value());
    if (!tmpl_obj.is_ok()) return error_response(500, api::kErrInternal, "token template unreadable");
    tmpl = EnrollmentTemplate::from_json(tmpl_obj.value());
    if (!tmpl.is_ok()) return error_response(500, api::kErrInternal, "token template unreadable");
  }
  auto policy = policy_for_enrollment(tmpl.value(), identity ? &*identity : nullptr);
  if (!policy.is_ok()) {
    audit(kEvent, "refused", "", peer, policy.status().message());
    int code = policy.status().kind() == ErrorKind::kRefused ? 403 : 400;
    return error_response(code, code == 403 ? api::kErrPolicyDenied : api::kErrBadRequest,
                          policy.status().message());
  }
  policy->tpm = tpm_policy;
  const std::string vid = new_volume_id();
  auto secret = SecretBuffer::random(api::kVolumeSecretSize);
  if (!secret.is_ok()) return error_response(500, api::kErrInternal, "no randomness");
  auto sealed = seal_volume_secret(kek_, secret.value(), vid);
  if (!sealed.is_ok()) return error_response(500, api::kErrInternal, "could not seal secret");
  auto wrapped =
      wrap_secret_for_client(secret.value(), common->client_public_key, vid, common->nonce);
  if (!wrapped.is_ok()) {
    audit(kEvent, "refused", vid, peer, wrapped.status().message());
    return error_response(400, api::kErrBadRequest, "client public key unusable");
  }
  const int64_t now = clock_.now_unix();
  VolumeRecord record{vid, VolumeState::kPending, to_json(policy->to_json()),
                      std::move(sealed).value(), description.value(), now, now};
  Status stored = store_.insert_volume(record);
  if (!stored.is_ok()) {
    audit(kEvent, "error", vid, peer, stored.message());
    return error_response(500, api::kErrInternal, "could not store volume");
  }
  if (!write_audit(kEvent, "ok", vid, peer,
                   str_cat(identity ? identity->summary() : std::string("no evidence"), ", by ",
                           how))
           .is_ok()) {
    return unaudited(kEvent, vid);  // the volume stays pending: never unlockable
  }
  ApiResponse r;
  r.body["volume_id"] = vid;
  r.body["wrapped"] = wrapped->to_json();
  r.body["policy"] = policy->to_json();
  return r;
}

ApiResponse KeyService::enroll_confirm(std::string_view body, const std::string& peer) {
  const char* kEvent = "enroll.confirm";
  auto request = parse_request(kEvent, body, peer);
  if (!request.is_ok()) return error_response(400, api::kErrBadRequest, request.status().message());
  auto volume_id = json_string(request.value(), "volume_id", api::kMaxVolumeIdLength);
  if (!volume_id.is_ok() || !api::is_valid_volume_id(volume_id.value())) {
    return error_response(400, api::kErrBadRequest, "field 'volume_id' missing or malformed");
  }
  const std::string& vid = volume_id.value();
  auto proof = decode_fixed(request.value(), "proof", kSha256Size);
  if (!proof.is_ok()) return error_response(400, api::kErrBadRequest, proof.status().message());
  auto record = store_.get_volume(vid);
  if (!record.is_ok()) {
    audit(kEvent, "refused", vid, peer, record.status().message());
    return error_response(403, api::kErrPolicyDenied, "not authorised for this volume");
  }
  auto secret = open_volume_secret(kek_, record->sealed_secret, vid);
  if (!secret.is_ok()) {
    audit(kEvent, "error", vid, peer, secret.status().message());
    return error_response(500, api::kErrInternal, "volume secret unavailable");
  }
  if (!constant_time_equal(api::enrollment_confirmation(secret.value(), vid), proof.value())) {
    audit(kEvent, "refused", vid, peer, "confirmation proof does not match");
    return error_response(403, api::kErrPolicyDenied, "confirmation proof does not match");
  }
  if (record->state == VolumeState::kRevoked) {
    audit(kEvent, "refused", vid, peer, "volume revoked");
    return error_response(403, api::kErrRevoked, "volume has been revoked");
  }
  if (record->state == VolumeState::kPending) {
    Status s = store_.transition_volume(vid, VolumeState::kPending, VolumeState::kActive,
                                        clock_.now_unix());
    if (!s.is_ok() && s.kind() != ErrorKind::kConflict) {
      audit(kEvent, "error", vid, peer, s.message());
      return error_response(500, api::kErrInternal, "could not confirm");
    }
  }
  audit(kEvent, "ok", vid, peer, "");
  ApiResponse r;
  r.body["volume_id"] = vid;
  r.body["state"] = "active";
  return r;
}

}  // namespace keygate::server
