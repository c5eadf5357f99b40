#include "unlocker/evidence.h"

#include "core/encoding.h"
#include "unlocker/http_client.h"

namespace keygate::unlocker {
namespace {

constexpr size_t kMaxMetadataResponse = 16 * 1024;

bool is_base64_text(const std::string& s) {
  for (char c : s) {
    bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '+' || c == '/' || c == '=' || c == '\n' || c == '\r';
    if (!ok) return false;
  }
  return !s.empty();
}

}  // namespace

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
  if (token->status != 200 || token->body.empty()) {
    return Status::error(ErrorKind::kUnavailable,
                         str_cat("AWS metadata token: HTTP ", token->status));
  }
  for (char c : token->body) {
    if (c < 0x21 || c > 0x7e) {
      return Status::error(ErrorKind::kUnavailable, "AWS metadata token: malformed");
    }
  }
  HttpRequest sig_req;
  sig_req.url = metadata_url + "/latest/dynamic/instance-identity/rsa2048";
  sig_req.headers = {"X-aws-ec2-metadata-token: " + token->body};
  sig_req.connect_timeout_ms = token_req.connect_timeout_ms;
  sig_req.total_timeout_ms = timeout_ms;
  sig_req.max_response = kMaxMetadataResponse;
  auto sig = session.perform(sig_req);
  if (!sig.is_ok()) return sig.status().with_context("AWS identity signature");
  if (sig->status != 200 || !is_base64_text(sig->body)) {
    return Status::error(ErrorKind::kUnavailable,
                         str_cat("AWS identity signature: HTTP ", sig->status,
                                 sig->status == 200 ? " with a malformed body" : ""));
  }
  Json::Value evidence;
  evidence["aws"]["rsa2048"] = sig->body;
  return evidence;
}

}  // namespace keygate::unlocker
