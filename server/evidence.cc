#include "server/evidence.h"

#include "core/json.h"
#include "core/protocol.h"

namespace keygate::server {

Result<Identity> EvidenceVerifier::verify_identity(const Json::Value& evidence, const Bytes& binding) const {
  if (!evidence.isObject() || evidence.size() != 1) {
    return Status::error(ErrorKind::kInvalidArgument,
                         "evidence: exactly one of 'aws', 'gcp', 'azure' expected");
  }
  const std::string platform = evidence.getMemberNames()[0];
  const Json::Value& body = evidence[platform];
  if (!body.isObject()) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("evidence.", platform, ": not an object"));
  }
  if (platform == api::field::kAws) {
    // The document carries no nonce (see README, threat model).
    auto sig = json_string(body, api::field::kAwsSignature, api::kMaxEvidenceField);
    if (!sig.is_ok()) return sig.status().with_context("evidence.aws");
    auto der = base64_decode(sig.value(), true);
    if (!der.is_ok()) return der.status().with_context("evidence.aws.rsa2048");
    auto id = verify_aws_identity(der.value(), trust_.aws, clock_);
    if (!id.is_ok()) return id.status();
    return to_identity(id.value());
  }
  if (platform == api::field::kGcp) {
    auto token = json_string(body, api::field::kGcpToken, api::kMaxEvidenceField);
    if (!token.is_ok()) return token.status().with_context("evidence.gcp");
    if (trust_.gcp.empty()) {
      return Status::error(ErrorKind::kIntegrity, "GCP evidence: no Google JWK set is configured");
    }
    GcpTokenCheck check;
    check.audience = api::gcp_audience(binding);
    check.max_age_seconds = trust_.max_age_seconds;
    return verify_gcp_identity_token(token.value(), *trust_.gcp.keys(), clock_, check);
  }
  if (platform == api::field::kAzure) {
    auto encoding = json_string(body, api::field::kAzureEncoding, 16);
    if (!encoding.is_ok() || encoding.value() != "pkcs7") {
      return Status::error(ErrorKind::kInvalidArgument, "evidence.azure: encoding must be pkcs7");
    }
    auto sig = json_string(body, api::field::kAzureSignature, api::kMaxEvidenceField);
    if (!sig.is_ok()) return sig.status().with_context("evidence.azure");
    auto der = base64_decode(sig.value(), true);
    if (!der.is_ok()) return der.status().with_context("evidence.azure.signature");
    AzureDocumentCheck check;
    check.nonce = api::azure_nonce(binding);
    check.max_age_seconds = trust_.max_age_seconds;
    return verify_azure_attested_document(der.value(), trust_.azure, clock_, check);
  }
  return Status::error(ErrorKind::kInvalidArgument,
                       str_cat("evidence: unknown platform '", platform.substr(0, 32), "'"));
}

}  // namespace keygate::server
