// Instance evidence from the cloud metadata service: AWS (IMDSv2 identity
// document), GCP (identity token with the binding as audience) and Azure
// (attested document with the binding as nonce). The platform is taken from
// configuration, or detected by probing the metadata endpoints, so one image
// works on any of the three clouds.
#pragma once

#include <json/value.h>

#include <future>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "core/encoding.h"
#include "core/status.h"
#include "unlocker/http_client.h"

namespace keygate::unlocker {

constexpr char kDefaultMetadataUrl[] = "http://169.254.169.254";

enum class Platform { kAws, kGcp, kAzure };

const char* platform_name(Platform p);
// "aws", "gcp" or "azure"; anything else is kInvalidArgument.
Result<Platform> parse_platform(std::string_view name);

// AWS IMDSv2: a session token (PUT /latest/api/token), then the rsa2048
// signature of the instance identity document. Returns
// {"aws": {"rsa2048": "<base64 CMS>"}}. Failures are kUnavailable.
Result<Json::Value> collect_aws_evidence(const std::string& metadata_url, long timeout_ms);

// GCP: the default service account's identity token, format=full, with the
// audience api::gcp_audience(binding). Returns {"gcp": {"identity_token": JWT}}.
Result<Json::Value> collect_gcp_evidence(const std::string& metadata_url, const Bytes& binding,
                                         long timeout_ms);

// Azure: the attested document with nonce api::azure_nonce(binding).
// Returns {"azure": {"encoding": "pkcs7", "signature": "<base64>"}}.
Result<Json::Value> collect_azure_evidence(const std::string& metadata_url, const Bytes& binding,
                                           long timeout_ms);

// What one metadata answer becomes (untrusted bytes from the network; the
// collectors above fetch, these check): the IMDSv2 session token (printable
// ASCII, no spaces), AWS's base64 signature, GCP's JWT, Azure's attested
// document. Anything else is kUnavailable, naming the answer's HTTP status.
Result<std::string> aws_session_token_from(const HttpResponse& r);
Result<Json::Value> aws_evidence_from(const HttpResponse& r);
Result<Json::Value> gcp_evidence_from(const HttpResponse& r);
Result<Json::Value> azure_evidence_from(const HttpResponse& r);

// Evidence for the requests of one command. The platform is the configured
// one or detected once: AWS's evidence fetch is its probe (kept for the first
// request); if it fails, GCP's and Azure's endpoints are probed. Evidence that
// does not depend on the challenge (AWS) is fetched once and reused.
class EvidenceCollector {
 public:
  EvidenceCollector(std::string metadata_url, std::optional<Platform> platform, long timeout_ms);
  ~EvidenceCollector();
  EvidenceCollector(const EvidenceCollector&) = delete;
  EvidenceCollector& operator=(const EvidenceCollector&) = delete;

  // Starts platform detection (and AWS's fetch) in the background.
  void start();
  // The platform, detecting it if needed. kUnavailable if nothing answered.
  Result<Platform> platform();
  // Evidence bound to `binding` (core/envelope.h's binding_value of the
  // request's nonce, client key and volume id).
  Result<Json::Value> collect(const Bytes& binding);

 private:
  struct Detected {
    Result<Platform> platform;
    Result<Json::Value> aws;  // AWS's evidence when detection found AWS
  };
  Detected detect();

  const std::string url_;
  const std::optional<Platform> configured_;
  const long timeout_ms_;
  std::mutex mu_;
  std::future<Detected> pending_;
  std::optional<Platform> platform_;
  std::optional<Json::Value> aws_cache_;
};

}  // namespace keygate::unlocker
