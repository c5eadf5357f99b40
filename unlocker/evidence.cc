#include "unlocker/evidence.h"

#include <strings.h>
#include <sys/resource.h>
#include <unistd.h>

#include "core/json.h"
#include "core/log.h"
#include "core/protocol.h"
#include "unlocker/http_client.h"

namespace keygate::unlocker {
namespace {

constexpr size_t kMaxMetadataResponse = 16 * 1024;
constexpr long kProbeTimeoutMs = 1000;

bool is_base64_text(const std::string& s) {
  for (char c : s) {
    bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '+' || c == '/' || c == '=' || c == '\n' || c == '\r';
    if (!ok) return false;
  }
  return !s.empty();
}

bool is_jwt_text(const std::string& s) {
  size_t dots = 0;
  for (char c : s) {
    bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.';
    if (!ok) return false;
    dots += c == '.';
  }
  return dots == 2;
}

HttpRequest metadata_get(const std::string& url, std::vector<std::string> headers, long timeout_ms) {
  HttpRequest req;
  req.url = url;
  req.headers = std::move(headers);
  req.connect_timeout_ms = std::min(timeout_ms, 2000L);
  req.total_timeout_ms = timeout_ms;
  req.max_response = kMaxMetadataResponse;
  return req;
}

Status unavailable(const char* what, const HttpResponse& r) {
  return Status::error(ErrorKind::kUnavailable,
                       str_cat(what, ": HTTP ", r.status, r.status == 200 ? " with a malformed body" : ""));
}

bool has_header(const HttpResponse& r, std::string_view name, std::string_view value) {
  for (const auto& [k, v] : r.headers) {
    if (k.size() == name.size() && strncasecmp(k.c_str(), name.data(), name.size()) == 0 && v == value) {
      return true;
    }
  }
  return false;
}

// GCP answers its own paths with "Metadata-Flavor: Google".
bool probe_gcp(const std::string& url) {
  HttpSession session;
  auto r = session.perform(metadata_get(url + "/computeMetadata/v1/instance/id",
                                        {"Metadata-Flavor: Google"}, kProbeTimeoutMs));
  return r.is_ok() && r->status == 200 && has_header(r.value(), "Metadata-Flavor", "Google");
}

bool probe_azure(const std::string& url) {
  HttpSession session;
  auto r = session.perform(metadata_get(
      url + "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text",
      {"Metadata: true"}, kProbeTimeoutMs));
  return r.is_ok() && r->status == 200 && !r->body.empty() && r->body.size() <= 64;
}

}  // namespace

const char* platform_name(Platform p) {
  switch (p) {
    case Platform::kAws: return "aws";
    case Platform::kGcp: return "gcp";
    case Platform::kAzure: return "azure";
  }
  return "?";
}

Result<Platform> parse_platform(std::string_view name) {
  if (name == "aws") return Platform::kAws;
  if (name == "gcp") return Platform::kGcp;
  if (name == "azure") return Platform::kAzure;
  return Status::error(ErrorKind::kInvalidArgument,
                       str_cat("unknown platform '", name, "' (aws, gcp or azure)"));
}

Result<std::string> aws_session_token_from(const HttpResponse& r) {
  if (r.status != 200 || r.body.empty()) {
    return Status::error(ErrorKind::kUnavailable, str_cat("AWS metadata token: HTTP ", r.status));
  }
  for (char c : r.body) {
    if (c < 0x21 || c > 0x7e) {
      return Status::error(ErrorKind::kUnavailable, "AWS metadata token: malformed");
    }
  }
  return r.body;
}

Result<Json::Value> aws_evidence_from(const HttpResponse& r) {
  if (r.status != 200 || !is_base64_text(r.body)) return unavailable("AWS identity signature", r);
  Json::Value evidence;
  evidence[api::field::kAws][api::field::kAwsSignature] = r.body;
  return evidence;
}

Result<Json::Value> gcp_evidence_from(const HttpResponse& r) {
  if (r.status != 200 || !is_jwt_text(r.body)) return unavailable("GCP identity token", r);
  Json::Value evidence;
  evidence[api::field::kGcp][api::field::kGcpToken] = r.body;
  return evidence;
}

Result<Json::Value> azure_evidence_from(const HttpResponse& r) {
  Json::Value doc;
  if (r.status == 200) {
    auto parsed = parse_json_object(r.body, kMaxMetadataResponse);
    if (parsed.is_ok()) doc = parsed.value();
  }
  if (!doc.isObject() || !doc["encoding"].isString() || doc["encoding"].asString() != "pkcs7" ||
      !doc["signature"].isString() || !is_base64_text(doc["signature"].asString())) {
    return unavailable("Azure attested document", r);
  }
  Json::Value evidence;
  evidence[api::field::kAzure][api::field::kAzureEncoding] = "pkcs7";
  evidence[api::field::kAzure][api::field::kAzureSignature] = doc["signature"];
  return evidence;
}

Result<Json::Value> collect_aws_evidence(const std::string& metadata_url, long timeout_ms) {
  HttpRequest token_req;
  token_req.method = "PUT";
  token_req.url = metadata_url + "/latest/api/token";
  token_req.headers = {"X-aws-ec2-metadata-token-ttl-seconds: 60"};
  token_req.connect_timeout_ms = std::min(timeout_ms, 2000L);
  token_req.total_timeout_ms = timeout_ms;
  token_req.max_response = 256;
  HttpSession session;
  auto token = session.perform(token_req);
  if (!token.is_ok()) return token.status().with_context("AWS metadata token");
  auto session_token = aws_session_token_from(token.value());
  if (!session_token.is_ok()) return session_token.status();
  auto sig = session.perform(metadata_get(metadata_url + "/latest/dynamic/instance-identity/rsa2048",
                                          {"X-aws-ec2-metadata-token: " + session_token.value()},
                                          timeout_ms));
  if (!sig.is_ok()) return sig.status().with_context("AWS identity signature");
  return aws_evidence_from(sig.value());
}

Result<Json::Value> collect_gcp_evidence(const std::string& metadata_url, const Bytes& binding,
                                         long timeout_ms) {
  HttpSession session;
  // The audience is base64url plus ':' characters: nothing to escape.
  auto r = session.perform(metadata_get(
      metadata_url + "/computeMetadata/v1/instance/service-accounts/default/identity?audience=" +
          api::gcp_audience(binding) + "&format=full",
      {"Metadata-Flavor: Google"}, timeout_ms));
  if (!r.is_ok()) return r.status().with_context("GCP identity token");
  return gcp_evidence_from(r.value());
}

Result<Json::Value> collect_azure_evidence(const std::string& metadata_url, const Bytes& binding,
                                           long timeout_ms) {
  HttpSession session;
  auto r = session.perform(metadata_get(metadata_url +
                                            "/metadata/attested/document?api-version=2020-09-01&nonce=" +
                                            api::azure_nonce(binding),
                                        {"Metadata: true"}, timeout_ms));
  if (!r.is_ok()) return r.status().with_context("Azure attested document");
  return azure_evidence_from(r.value());
}

EvidenceCollector::EvidenceCollector(std::string metadata_url, std::optional<Platform> platform,
                                     long timeout_ms)
    : url_(std::move(metadata_url)), configured_(platform), timeout_ms_(timeout_ms) {}

EvidenceCollector::~EvidenceCollector() {
  if (pending_.valid()) pending_.wait();
}

EvidenceCollector::Detected EvidenceCollector::detect() {
  if (configured_ && configured_ != Platform::kAws) {
    return {configured_.value(), Status::error(ErrorKind::kNotFound, "not AWS")};
  }
  // AWS's probe is its evidence (a token and the signed document), so on AWS
  // detection costs nothing; elsewhere the other two are probed after it.
  Result<Json::Value> aws = collect_aws_evidence(url_, std::min(timeout_ms_, 2000L));
  if (configured_ || aws.is_ok()) {
    return {aws.is_ok() ? Result<Platform>(Platform::kAws) : Result<Platform>(aws.status()), aws};
  }
  auto azure = std::async(std::launch::async, probe_azure, url_);
  if (probe_gcp(url_)) return {Platform::kGcp, aws.status()};
  if (azure.get()) return {Platform::kAzure, aws.status()};
  return {Status::error(ErrorKind::kUnavailable,
                        str_cat("no cloud metadata service answered at ", url_, " (AWS: ",
                                aws.status().message(), "; set the platform to skip detection)")),
          aws.status()};
}

void EvidenceCollector::start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (platform_ || pending_.valid()) return;
  if (configured_ && configured_ != Platform::kAws) {
    platform_ = configured_;
    return;
  }
  pending_ = std::async(std::launch::async, [this]() {
    // Needed only once the server's challenge is back: on a busy small
    // instance this thread yields to the header read and the TLS setup.
    (void)setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), 10);
    return detect();
  });
}

Result<Platform> EvidenceCollector::platform() {
  std::lock_guard<std::mutex> lock(mu_);
  if (platform_) return platform_.value();
  Detected d = pending_.valid() ? pending_.get() : detect();
  log_debug(d.platform.is_ok() ? str_cat("platform ", platform_name(d.platform.value()))
                               : std::string("no platform detected"));
  if (d.aws.is_ok()) aws_cache_ = d.aws.value();
  if (!d.platform.is_ok()) return d.platform.status();  // detection is tried again next time
  platform_ = d.platform.value();
  return platform_.value();
}

Result<Json::Value> EvidenceCollector::collect(const Bytes& binding) {
  auto p = platform();
  if (!p.is_ok()) return p.status();
  switch (p.value()) {
    case Platform::kAws: {
      std::lock_guard<std::mutex> lock(mu_);
      if (aws_cache_) return aws_cache_.value();
      auto e = collect_aws_evidence(url_, std::min(timeout_ms_, 2000L));
      if (e.is_ok()) aws_cache_ = e.value();
      return e;
    }
    case Platform::kGcp: return collect_gcp_evidence(url_, binding, std::min(timeout_ms_, 5000L));
    case Platform::kAzure: return collect_azure_evidence(url_, binding, std::min(timeout_ms_, 5000L));
  }
  return Status::error(ErrorKind::kInternal, "unknown platform");
}

}  // namespace keygate::unlocker
