#include "server/webhook.h"

#include <chrono>

#include "core/crypto.h"
#include "core/encoding.h"
#include "core/file.h"
#include "core/log.h"
#include "unlocker/http_client.h"

namespace keygate::server {
namespace {

constexpr size_t kMinSecret = 32;
constexpr size_t kMaxSecret = 1024;
constexpr size_t kMaxCaFile = 256 * 1024;

}  // namespace

std::string webhook_signature(const SecretBuffer& secret, int64_t timestamp, const std::string& body) {
  const std::string signed_text = str_cat(timestamp, ".", body);
  return str_cat("t=", timestamp, ",sha256=", hex_encode(hmac_sha256(secret, signed_text)));
}

Result<std::unique_ptr<Webhook>> Webhook::open(const WebhookOptions& o, const Clock& clock, Outcome outcome) {
  if (o.url.rfind("https://", 0) != 0 || o.url.size() <= 8) {
    return Status::error(ErrorKind::kInvalidArgument, "webhook: url must be https://HOST[:PORT]/PATH");
  }
  auto secret = read_secret_file(o.secret_file, kMaxSecret, true);
  if (!secret.is_ok()) return secret.status().with_context("webhook: secret_file");
  if (secret->size() < kMinSecret) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("webhook: secret_file ", o.secret_file, " holds fewer than ", kMinSecret, " bytes"));
  }
  auto ca = read_small_file(o.ca_file, kMaxCaFile);
  if (!ca.is_ok()) return ca.status().with_context("webhook: ca_file");
  if (ca->find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("webhook: ca_file ", o.ca_file, " holds no PEM certificate"));
  }
  return std::unique_ptr<Webhook>(
      new Webhook(o, clock, std::move(secret).value(), std::move(ca).value(), std::move(outcome)));
}

Webhook::Webhook(const WebhookOptions& options, const Clock& clock, SecretBuffer secret, std::string ca_pem,
                 Outcome outcome)
    : options_(options), clock_(clock), secret_(std::move(secret)), ca_pem_(std::move(ca_pem)),
      outcome_(std::move(outcome)) {
  thread_ = std::thread([this] { run(); });
}

Webhook::~Webhook() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void Webhook::notify(const std::string& type, Json::Value fields) {
  Json::Value body = fields.isObject() ? std::move(fields) : Json::Value(Json::objectValue);
  body["type"] = type;
  body["time"] = static_cast<Json::Int64>(clock_.now_unix());
  const std::string id = hex_encode(random_bytes(12));
  body["id"] = id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (static_cast<int>(queue_.size()) >= options_.max_queued) {
      if (outcome_) outcome_("dropped");
      return;
    }
    queue_.push_back({type, id, to_json(body)});
  }
  wake_.notify_one();
}

void Webhook::run() {
  unlocker::prepare_https();
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (stopping_) return;
    Queued next = std::move(queue_.front());
    queue_.pop_front();
    bool delivered = false;
    long wait_ms = options_.first_retry_ms;
    for (int attempt = 1; attempt <= options_.max_attempts && !stopping_; ++attempt) {
      lock.unlock();
      delivered = deliver(next.type, next.id, next.body);
      lock.lock();
      if (delivered || attempt == options_.max_attempts) break;
      // Backoff; a stop ends the wait (what is still queued is not sent).
      wake_.wait_for(lock, std::chrono::milliseconds(wait_ms), [this] { return stopping_; });
      wait_ms *= 2;
    }
    if (outcome_) outcome_(delivered ? "delivered" : "failed");
    if (!delivered && !stopping_) {
      log_warning(str_cat("webhook: ", next.type, " ", next.id, " not delivered after ", options_.max_attempts,
                          " attempts; it stays on the audit trail only"));
    }
  }
}

bool Webhook::deliver(const std::string& type, const std::string& id, const std::string& body) {
  unlocker::HttpRequest request;
  request.method = "POST";
  request.url = options_.url;
  request.ca_pem = ca_pem_;
  request.connect_timeout_ms = std::min(2000L, options_.timeout_ms);
  request.total_timeout_ms = options_.timeout_ms;
  request.max_response = 16 * 1024;
  request.body = reinterpret_cast<const uint8_t*>(body.data());
  request.body_size = body.size();
  request.headers = {"Content-Type: application/json", str_cat("X-Keygate-Event: ", type),
                     str_cat("X-Keygate-Delivery: ", id),
                     str_cat("X-Keygate-Signature: ", webhook_signature(secret_, clock_.now_unix(), body))};
  unlocker::HttpSession session;  // a new connection for each attempt: a receiver may have restarted
  auto response = session.perform(request);
  if (!response.is_ok()) {
    log_warning(str_cat("webhook: ", type, " ", id, ": ", response.status().message()));
    return false;
  }
  if (response->status < 200 || response->status > 299) {
    log_warning(str_cat("webhook: ", type, " ", id, ": the receiver answered HTTP ", response->status));
    return false;
  }
  return true;
}

}  // namespace keygate::server
