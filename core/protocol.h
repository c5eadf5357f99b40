// The keygate wire protocol (JSON over HTTPS, versioned under /v1), shared by
// the unlocker and the server. Every limit here is enforced on both sides.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "core/encoding.h"
#include "core/secret.h"

namespace keygate::api {

constexpr char kChallengePath[] = "/v1/challenge";
constexpr char kUnlockPath[] = "/v1/unlock";
constexpr char kEnrollRegisterPath[] = "/v1/enroll/register";
constexpr char kEnrollConfirmPath[] = "/v1/enroll/confirm";
constexpr char kEnrollAbandonPath[] = "/v1/enroll/abandon";

constexpr size_t kMaxRequestBody = 64 * 1024;
constexpr size_t kMaxResponseBody = 64 * 1024;
constexpr size_t kNonceSize = 32;
constexpr size_t kVolumeSecretSize = 32;
constexpr size_t kMaxVolumeIdLength = 64;
constexpr size_t kMaxEnrollmentTokenLength = 128;
constexpr size_t kMaxEvidenceField = 16 * 1024;
// A volume's description: UTF-8 text without control characters.
constexpr size_t kMaxDescriptionLength = 256;

// Error codes carried in {"error": {"code": ..., "message": ...}}.
constexpr char kErrBadRequest[] = "bad_request";
constexpr char kErrTooLarge[] = "request_too_large";
constexpr char kErrNonceInvalid[] = "nonce_invalid";
constexpr char kErrEvidenceInvalid[] = "evidence_invalid";
constexpr char kErrPolicyDenied[] = "policy_denied";
constexpr char kErrRevoked[] = "revoked";
constexpr char kErrNotEnrolled[] = "not_enrolled";
constexpr char kErrTokenInvalid[] = "enrollment_token_invalid";
constexpr char kErrTpmRequired[] = "tpm_required";
constexpr char kErrInternal[] = "internal";
constexpr char kErrBusy[] = "busy";  // 503: retry later
constexpr char kErrRateLimited[] = "rate_limited";  // 429 with Retry-After
constexpr char kErrAuditUnavailable[] = "audit_unavailable";  // 503: nothing released
constexpr char kErrNotFound[] = "not_found";                  // no such endpoint
constexpr char kErrMethodNotAllowed[] = "method_not_allowed";
constexpr char kErrVolumeActive[] = "volume_active";  // 409: abandon of a confirmed volume
// 403: an approver denied the release, or its request expired undecided.
constexpr char kErrApprovalDenied[] = "approval_denied";

// Every code KeyService answers with (the router adds kErrNotFound and
// kErrMethodNotAllowed for requests that reach no endpoint).
constexpr const char* kServiceErrorCodes[] = {
    kErrBadRequest, kErrTooLarge,    kErrNonceInvalid, kErrEvidenceInvalid, kErrPolicyDenied,
    kErrRevoked,    kErrNotEnrolled, kErrTokenInvalid, kErrTpmRequired,     kErrInternal,
    kErrBusy,       kErrAuditUnavailable, kErrRateLimited, kErrVolumeActive, kErrApprovalDenied};

// Field names of the JSON bodies, both directions.
namespace field {
constexpr char kVolumeId[] = "volume_id";
constexpr char kNonce[] = "nonce";
constexpr char kExpiresIn[] = "expires_in";
constexpr char kClientPublicKey[] = "client_public_key";
constexpr char kEvidence[] = "evidence";
constexpr char kTpm[] = "tpm";
// An unlock that waits for people: the server answers 202 with "approval"
// (request_id, state, expires_in, instance, claims, ...), and the instance
// asks again with "approval_request" set to that id.
constexpr char kApproval[] = "approval";
constexpr char kApprovalRequest[] = "approval_request";
constexpr char kRequestId[] = "request_id";
constexpr char kEnrollmentToken[] = "enrollment_token";
constexpr char kDescription[] = "description";
constexpr char kProof[] = "proof";
constexpr char kRotates[] = "rotates";
constexpr char kRotatesProof[] = "rotates_proof";
constexpr char kWrapped[] = "wrapped";
constexpr char kPolicy[] = "policy";
constexpr char kState[] = "state";
constexpr char kError[] = "error";
constexpr char kCode[] = "code";
constexpr char kMessage[] = "message";
// Inside "evidence": one of these platform objects.
constexpr char kAws[] = "aws";
constexpr char kAwsSignature[] = "rsa2048";
constexpr char kGcp[] = "gcp";
constexpr char kGcpToken[] = "identity_token";
constexpr char kAzure[] = "azure";
constexpr char kAzureEncoding[] = "encoding";
constexpr char kAzureSignature[] = "signature";
// Inside "tpm" (server/tpm_policy.h).
constexpr char kTpmAttest[] = "attest";
constexpr char kTpmSignature[] = "signature";
constexpr char kTpmPcrs[] = "pcrs";
constexpr char kTpmAkPublic[] = "ak_public";
constexpr char kTpmBank[] = "bank";
constexpr char kTpmSealed[] = "sealed";
}  // namespace field

// How the binding value (envelope.h) travels in evidence a provider signs:
//  - GCP identity token audience: "keygate:v1:" + base64url(binding), 54 chars;
//  - Azure attested-document nonce: hex of the binding's first 16 bytes
//    (Azure accepts at most 32 alphanumeric characters), 128 bits.
std::string gcp_audience(const Bytes& binding);
std::string azure_nonce(const Bytes& binding);

// Volume ids are server-generated UUIDs; accept only that alphabet.
bool is_valid_volume_id(std::string_view id);

// Proof, sent with enrollment confirmation, that the client received the
// secret: HMAC-SHA256(secret, "keygate-v1 confirm" || volume_id).
Bytes enrollment_confirmation(const SecretBuffer& secret, std::string_view volume_id);

// Proof, sent when a client gives up an enrollment it could not complete
// (its keyslot removed), that it holds the secret:
// HMAC-SHA256(secret, "keygate-v1 abandon" || volume_id).
Bytes enrollment_abandonment(const SecretBuffer& secret, std::string_view volume_id);

// Proof, sent with a registration that replaces a volume (keygate rotate),
// that the client holds the old volume's secret now:
// HMAC-SHA256(old secret, "keygate-v1 rotate" || old volume_id || nonce).
Bytes rotation_proof(const SecretBuffer& old_secret, std::string_view old_volume_id,
                     const Bytes& nonce);

}  // namespace keygate::api
