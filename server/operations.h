// What the operators see of a running key server (README "Operators'
// view"): its Prometheus metrics (server/metrics.h) and its webhook
// notifications (server/webhook.h). The key service, the admin API and the
// HTTPS front report here; nothing here can hold up or fail a request.
//
// Label values come from fixed sets only (platform names, the API's error
// codes, approval states), never from what a client sent as it sent it, so
// no client can grow the metrics without bound.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "core/clock.h"
#include "server/approvals.h"
#include "server/metrics.h"
#include "server/store.h"
#include "server/webhook.h"

namespace keygate::server {

// "aws", "gcp", "azure", or "other" for anything else (or nothing).
std::string platform_label(std::string_view platform);

class Operations {
 public:
  // `refusal_spike`: refusals within a minute that make a spike (0: never).
  explicit Operations(const Clock& clock, int refusal_spike = 60);
  // Notifications go to `webhook` from now on (before serving starts).
  void attach_webhook(std::unique_ptr<Webhook> webhook) { webhook_ = std::move(webhook); }

  // An unlock that released its key; one refused (or failed) with the
  // API's error `code`; its whole time at the key service.
  void released(const std::string& platform);
  void refused(const std::string& platform, const std::string& code);
  void unlock_took(double seconds);
  // Evidence that did not verify: `kind` is its platform's name, or
  // "tpm_quote".
  void evidence_failed(const std::string& kind);
  // One store call of kind `op` ("nonce_put", "nonce_consume",
  // "volume_get", "audit_append") and its time.
  void store_took(const char* op, double seconds);
  // A record the trail could not take (also a webhook notification).
  void audit_failed(const AuditEvent& event, const std::string& why);
  // An approval request made, decided (approve/deny by `who`), expired.
  void approval_requested(const Approval& request, int64_t now);
  void approval_decided(const Approval& decided, bool approve, const std::string& who,
                        const std::string& reason, int64_t now);
  void approval_expired(const Approval& request, int64_t now);
  // A delivery's outcome (Webhook::Outcome).
  void webhook_outcome(const char* outcome);

  // The text format, with the gauges read at scrape time.
  std::string render(int64_t outstanding_nonces, int open_connections);

  Metrics& metrics() { return metrics_; }

 private:
  void notify(const std::string& type, Json::Value fields);

  const Clock& clock_;
  Metrics metrics_;
  std::unique_ptr<Webhook> webhook_;
  int refusal_spike_;
  std::mutex spike_mu_;
  int64_t spike_minute_ = 0;  // the minute being counted (unix time / 60)
  int spike_count_ = 0;
  bool spike_sent_ = false;
};

}  // namespace keygate::server
