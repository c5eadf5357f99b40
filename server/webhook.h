// Webhook notifications (README "Notifications"): events the security team
// wants to hear about at once (an approval request, a decision, a spike of
// refusals, an audit write failure) sent as a JSON POST over HTTPS to one
// receiver, trusting only a pinned CA, the body signed with HMAC-SHA256.
//
// Delivery never holds up the key service: notify() only queues (bounded;
// when full, the new notification is dropped and counted), and one thread
// of its own delivers, retrying with backoff. A notification is a signal,
// not the record: the audit trail is the record.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "core/clock.h"
#include "core/json.h"
#include "core/secret.h"
#include "core/status.h"

namespace keygate::server {

struct WebhookOptions {
  std::string url;          // https:// only
  std::string ca_file;      // the receiver's CA: the only one trusted
  std::string secret_file;  // the HMAC key, 32 to 1024 bytes
  int refusal_spike = 60;   // refusals within a minute that make a spike
  int max_queued = 1000;
  int max_attempts = 6;     // the first and five retries: 1, 2, 4, 8, 16 s apart
  long first_retry_ms = 1000;
  long timeout_ms = 5000;   // one attempt, connect to last byte
};

// The signature header's value for `body` sent at `timestamp`:
// "t=<timestamp>,sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>".
std::string webhook_signature(const SecretBuffer& secret, int64_t timestamp, const std::string& body);

class Webhook {
 public:
  // What became of each notification, for the metrics: "delivered",
  // "failed" (every attempt failed) or "dropped" (the queue was full).
  using Outcome = std::function<void(const char* outcome)>;

  // Reads the secret and the CA; kInvalidArgument naming what is wrong.
  static Result<std::unique_ptr<Webhook>> open(const WebhookOptions& options, const Clock& clock,
                                               Outcome outcome);
  ~Webhook();  // delivers nothing more; waits for an attempt in flight

  // Queues {"type": type, "time": now, "id": a new id, ...fields}. Never blocks
  // on the network.
  void notify(const std::string& type, Json::Value fields);

 private:
  Webhook(const WebhookOptions& options, const Clock& clock, SecretBuffer secret, std::string ca_pem,
          Outcome outcome);
  void run();
  bool deliver(const std::string& type, const std::string& id, const std::string& body);

  const WebhookOptions options_;
  const Clock& clock_;
  const SecretBuffer secret_;
  const std::string ca_pem_;
  const Outcome outcome_;
  std::mutex mu_;
  std::condition_variable wake_;
  struct Queued {
    std::string type, id, body;
  };
  std::deque<Queued> queue_;
  bool stopping_ = false;
  uint64_t sent_ = 0;
  std::thread thread_;
};

}  // namespace keygate::server
