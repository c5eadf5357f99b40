#include "unlocker/server_client.h"

#include <algorithm>
#include <cstring>

#include "core/crypto.h"
#include "core/envelope.h"
#include "core/json.h"
#include "core/log.h"
#include "core/protocol.h"
#include "unlocker/http_client.h"

namespace keygate::unlocker {
namespace {

// The answer's status and body as the server sent them.
Result<HttpResponse> post_raw(HttpSession& session, const ServerEndpoint& server, const char* path,
                              const uint8_t* body, size_t size) {
  HttpRequest req;
  req.method = "POST";
  req.url = server.url + path;
  req.headers = {"Content-Type: application/json", "Accept: application/json"};
  req.body = body;
  req.body_size = size;
  req.ca_pem = server.ca_pem;
  req.connect_timeout_ms = std::min(server.timeout_ms, server.connect_timeout_ms);
  req.total_timeout_ms = server.timeout_ms;
  req.max_response = api::kMaxResponseBody;
  return session.perform(req);
}

Result<Json::Value> post_json(HttpSession& session, const ServerEndpoint& server,
                              const char* path, const uint8_t* body, size_t size) {
  auto res = post_raw(session, server, path, body, size);
  if (!res.is_ok()) return res.status();
  return read_server_answer(res->status, res->body, server.url + path);
}

Result<Json::Value> post_json(HttpSession& session, const ServerEndpoint& server,
                              const char* path, const std::string& body) {
  return post_json(session, server, path, reinterpret_cast<const uint8_t*>(body.data()),
                   body.size());
}

Result<Bytes> get_challenge(HttpSession& session, const ServerEndpoint& server) {
  auto res = post_json(session, server, api::kChallengePath, std::string("{}"));
  if (!res.is_ok()) return res.status();
  return read_challenge(res.value());
}

}  // namespace

Result<Json::Value> read_server_answer(long status, const std::string& body, const std::string& url) {
  auto parsed = parse_json_object(body, api::kMaxResponseBody);
  if (status == 200) {
    if (!parsed.is_ok()) return parsed.status().with_context(str_cat(url, ": response"));
    return parsed;
  }
  // A hostile server's words reach the console: printable, bounded.
  std::string code = "unknown", message;
  const Json::Value* error = parsed.is_ok() && parsed->isMember(api::field::kError)
                                 ? &parsed.value()[api::field::kError]
                                 : nullptr;
  if (error != nullptr && error->isObject()) {
    const Json::Value& c = (*error)[api::field::kCode];
    const Json::Value& m = (*error)[api::field::kMessage];
    if (c.isString()) code = printable(c.asString(), 64);
    if (m.isString()) message = printable(m.asString(), 200);
  }
  std::string what = str_cat(url, ": HTTP ", status, " ", code,
                             message.empty() ? "" : ": ", message);
  if (status == 403) return Status::error(ErrorKind::kRefused, what);
  if (status == 409) return Status::error(ErrorKind::kConflict, what);
  if (status == 429 || status >= 500) return Status::error(ErrorKind::kUnavailable, what);
  return Status::error(ErrorKind::kInvalidArgument, what);
}

Result<Bytes> read_challenge(const Json::Value& answer) {
  auto nonce_text = json_string(answer, api::field::kNonce, 128);
  if (!nonce_text.is_ok()) return nonce_text.status().with_context("challenge");
  auto nonce = base64_decode(nonce_text.value());
  if (!nonce.is_ok() || nonce->size() != api::kNonceSize) {
    return Status::error(ErrorKind::kInvalidArgument, "challenge: malformed nonce");
  }
  return std::move(nonce).value();
}

Result<SecretBuffer> open_envelope(const Json::Value& response, const X25519KeyPair& keys,
                                   const std::string& volume_id, const Bytes& nonce) {
  auto wrapped_json = json_object(response, api::field::kWrapped, true);
  if (!wrapped_json.is_ok()) return wrapped_json.status().with_context("server response");
  auto wrapped = WrappedSecret::from_json(wrapped_json.value());
  if (!wrapped.is_ok()) {
    return Status::error(ErrorKind::kIntegrity,
                         str_cat("server response: ", wrapped.status().message()));
  }
  auto secret = unwrap_secret(wrapped.value(), keys, volume_id, nonce);
  if (!secret.is_ok()) return secret.status();
  if (secret->size() != api::kVolumeSecretSize) {
    return Status::error(ErrorKind::kIntegrity, "released secret has the wrong size");
  }
  return secret;
}

Result<Enrollment> read_registration(const Json::Value& answer, const X25519KeyPair& keys,
                                     const Bytes& nonce) {
  auto volume_id = json_string(answer, api::field::kVolumeId, api::kMaxVolumeIdLength);
  if (!volume_id.is_ok() || !api::is_valid_volume_id(volume_id.value())) {
    return Status::error(ErrorKind::kInvalidArgument, "register: malformed volume id");
  }
  auto secret = open_envelope(answer, keys, volume_id.value(), nonce);
  if (!secret.is_ok()) return secret.status();
  return Enrollment{volume_id.value(), std::move(secret).value(), answer[api::field::kPolicy]};
}


Result<PendingApproval> read_pending_approval(const Json::Value& answer) {
  auto approval = json_object(answer, api::field::kApproval, true);
  if (!approval.is_ok()) return approval.status().with_context("approval answer");
  const Json::Value& a = approval.value();
  auto id = json_string(a, api::field::kRequestId, 64);
  if (!id.is_ok()) return id.status().with_context("approval answer");
  PendingApproval p;
  // An id is "req-" and letters and digits; anything else is not printed.
  for (char c : id.value()) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) {
      return Status::error(ErrorKind::kInvalidArgument, "approval answer: malformed request id");
    }
  }
  if (id->empty()) return Status::error(ErrorKind::kInvalidArgument, "approval answer: empty request id");
  p.request_id = id.value();
  p.instance = a["instance"].isString() ? printable(a["instance"].asString(), 64) : "-";
  p.expires_in_s = a["expires_in"].isInt64() ? static_cast<long>(std::clamp<int64_t>(a["expires_in"].asInt64(), 0, 86400)) : 0;
  p.approvals = a["approvals"].isInt() ? std::clamp(a["approvals"].asInt(), 0, 16) : 0;
  p.approvals_needed = a["approvals_needed"].isInt() ? std::clamp(a["approvals_needed"].asInt(), 1, 16) : 1;
  return p;
}

Result<SecretBuffer> request_volume_secret(const ServerEndpoint& server,
                                           const std::string& volume_id,
                                           EvidenceCollector& evidence, TpmAttester* tpm,
                                           const ApprovalWait* wait) {
  HttpSession session;
  std::string request_id;  // once the server made an approval request
  long until_ms = wait != nullptr ? wait->until_ms : 0;
  // A nonce can expire while evidence is slow to gather; one fresh retry.
  for (int attempt = 0, polls = 0;; ++attempt) {
    auto challenge = get_challenge(session, server);
    if (!challenge.is_ok()) return challenge.status();
    auto keys = X25519KeyPair::generate();
    if (!keys.is_ok()) return keys.status();
    Json::Value req;
    req[api::field::kVolumeId] = volume_id;
    req[api::field::kNonce] = base64_encode(challenge.value());
    req[api::field::kClientPublicKey] = base64_encode(keys->public_key.data(), keys->public_key.size());
    if (!request_id.empty()) req[api::field::kApprovalRequest] = request_id;
    const Bytes client_public(keys->public_key.begin(), keys->public_key.end());
    const Bytes binding = binding_value(challenge.value(), client_public, volume_id);
    auto collected = evidence.collect(binding);
    if (!collected.is_ok()) return collected.status();
    req[api::field::kEvidence] = collected.value();
    if (tpm != nullptr) {
      auto quote = tpm->evidence(binding, false);
      if (!quote.is_ok()) return quote.status();
      req[api::field::kTpm] = quote.value();
    }
    const std::string body = to_json(req);
    auto raw = post_raw(session, server, api::kUnlockPath, reinterpret_cast<const uint8_t*>(body.data()), body.size());
    if (!raw.is_ok()) return raw.status();
    if (raw->status == 202) {
      auto answer = parse_json_object(raw->body, api::kMaxResponseBody);
      if (!answer.is_ok()) return answer.status().with_context(server.url + api::kUnlockPath);
      auto pending = read_pending_approval(answer.value());
      if (!pending.is_ok()) return pending.status().with_context(server.url);
      if (pending->request_id != request_id) {
        request_id = pending->request_id;
        // The console's line: the operator and the approver name the same request.
        log_warning(str_cat("waiting for approval: request ", request_id, " (volume ", volume_id, ", instance ",
                            pending->instance, ")"));
        if (wait != nullptr && wait->until_ms == 0) until_ms = wait->now_ms() + pending->expires_in_s * 1000 + 2000;
      }
      if (wait == nullptr) {
        return Status::error(ErrorKind::kUnavailable,
                             str_cat("volume ", volume_id, ": approval request ", request_id, " is pending"));
      }
      const long pause = std::min(5000L, 1000L << std::min(polls++, 3));
      if (wait->now_ms() + pause >= until_ms) {
        return Status::error(ErrorKind::kUnavailable,
                             str_cat("volume ", volume_id, ": approval request ", request_id,
                                     " not decided in the time this unlock may wait (", pending->approvals, " of ",
                                     pending->approvals_needed, " approvals)"));
      }
      wait->sleep_ms(pause);
      attempt = -1;  // a fresh nonce retry for each poll
      continue;
    }
    auto res = read_server_answer(raw->status, raw->body, server.url + api::kUnlockPath);
    if (!res.is_ok()) {
      if (attempt == 0 && res.status().kind() == ErrorKind::kRefused &&
          res.status().message().find(api::kErrNonceInvalid) != std::string::npos) {
        continue;
      }
      return res.status();
    }
    if (!request_id.empty()) log_info(str_cat("volume ", volume_id, ": request ", request_id, " approved"));
    return open_envelope(res.value(), keys.value(), volume_id, challenge.value());
  }
}

Result<Enrollment> register_volume(const ServerEndpoint& server,
                                   const SecretBuffer& enrollment_token,
                                   EvidenceCollector* evidence, TpmAttester* tpm,
                                   const std::string& description, const Replacing* replacing) {
  for (size_t i = 0; i < enrollment_token.size(); ++i) {
    char c = static_cast<char>(enrollment_token.data()[i]);
    bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-';
    if (!ok || enrollment_token.size() > api::kMaxEnrollmentTokenLength) {
      return Status::error(ErrorKind::kInvalidArgument, "enrollment token is malformed");
    }
  }
  HttpSession session;
  auto challenge = get_challenge(session, server);
  if (!challenge.is_ok()) return challenge.status();
  auto keys = X25519KeyPair::generate();
  if (!keys.is_ok()) return keys.status();
  Json::Value req;
  req[api::field::kNonce] = base64_encode(challenge.value());
  req[api::field::kClientPublicKey] = base64_encode(keys->public_key.data(), keys->public_key.size());
  if (evidence != nullptr) {
    // No volume id exists yet: the binding covers "".
    const Bytes client_public(keys->public_key.begin(), keys->public_key.end());
    auto collected = evidence->collect(binding_value(challenge.value(), client_public, ""));
    if (!collected.is_ok()) return collected.status();
    req[api::field::kEvidence] = collected.value();
  }
  if (tpm != nullptr) {
    const Bytes client_public(keys->public_key.begin(), keys->public_key.end());
    auto quote = tpm->evidence(binding_value(challenge.value(), client_public, ""), true);
    if (!quote.is_ok()) return quote.status();
    req[api::field::kTpm] = quote.value();
  }
  if (!description.empty()) req[api::field::kDescription] = description;
  if (replacing != nullptr) {
    req[api::field::kRotates] = replacing->volume_id;
    const Bytes proof =
        api::rotation_proof(*replacing->secret, replacing->volume_id, challenge.value());
    req[api::field::kRotatesProof] = base64_encode(proof.data(), proof.size());
  }
  // Splice the token into the body inside secret memory:
  // {...,"enrollment_token":"TOKEN"}
  std::string head = to_json(req);
  head.pop_back();  // the closing brace
  const std::string key = str_cat(",\"", api::field::kEnrollmentToken, "\":\"");
  const std::string tail = "\"}";
  auto body = SecretBuffer::allocate(head.size() + key.size() + enrollment_token.size() +
                                     tail.size());
  if (!body.is_ok()) return body.status();
  uint8_t* p = body->data();
  memcpy(p, head.data(), head.size());
  p += head.size();
  memcpy(p, key.data(), key.size());
  p += key.size();
  if (enrollment_token.size() > 0) {  // none: enrollment by attestation
    memcpy(p, enrollment_token.data(), enrollment_token.size());
    p += enrollment_token.size();
  }
  memcpy(p, tail.data(), tail.size());
  auto res = post_json(session, server, api::kEnrollRegisterPath, body->data(), body->size());
  if (!res.is_ok()) return res.status();
  return read_registration(res.value(), keys.value(), challenge.value());
}

namespace {

// POSTs {volume_id, proof: proof_of(secret, volume_id)} to `path`.
Status post_proof(const ServerEndpoint& server, const char* path, const std::string& volume_id,
                  const SecretBuffer& secret,
                  Bytes (*proof_of)(const SecretBuffer&, std::string_view)) {
  Json::Value req;
  req[api::field::kVolumeId] = volume_id;
  req[api::field::kProof] = base64_encode(proof_of(secret, volume_id));
  HttpSession session;
  auto res = post_json(session, server, path, to_json(req));
  return res.is_ok() ? Status::ok() : res.status();
}

}  // namespace

Status confirm_volume(const ServerEndpoint& server, const std::string& volume_id,
                      const SecretBuffer& secret) {
  return post_proof(server, api::kEnrollConfirmPath, volume_id, secret, &api::enrollment_confirmation);
}

Status abandon_volume(const ServerEndpoint& server, const std::string& volume_id,
                      const SecretBuffer& secret) {
  return post_proof(server, api::kEnrollAbandonPath, volume_id, secret, &api::enrollment_abandonment);
}

}  // namespace keygate::unlocker
