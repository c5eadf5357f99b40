#include "server/operations.h"

namespace keygate::server {
namespace {

// Seconds; from a fast store call to an unlock that waited out its retries.
const std::vector<double> kLatencyBounds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                            0.25,  0.5,    1,     2.5,  5,     10};
// An approval's wait: a minute to a day.
const std::vector<double> kWaitBounds = {10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400};

constexpr char kReleases[] = "keygate_releases_total";
constexpr char kRefusals[] = "keygate_refusals_total";
constexpr char kUnlockSeconds[] = "keygate_unlock_duration_seconds";
constexpr char kEvidenceFailures[] = "keygate_evidence_failures_total";
constexpr char kAuditFailures[] = "keygate_audit_write_failures_total";
constexpr char kStoreSeconds[] = "keygate_store_duration_seconds";
constexpr char kApprovals[] = "keygate_approval_requests_total";
constexpr char kApprovalWait[] = "keygate_approval_wait_seconds";
constexpr char kNonces[] = "keygate_outstanding_nonces";
constexpr char kConnections[] = "keygate_open_connections";
constexpr char kWebhook[] = "keygate_webhook_notifications_total";

// The API's error codes are identifiers ([a-z_]); anything else is "other".
std::string code_label(const std::string& code) {
  if (code.empty() || code.size() > 40) return "other";
  for (char c : code) {
    if (!((c >= 'a' && c <= 'z') || c == '_')) return "other";
  }
  return code;
}

}  // namespace

std::string platform_label(std::string_view platform) {
  if (platform == "aws" || platform == "gcp" || platform == "azure") return std::string(platform);
  return "other";
}

Operations::Operations(const Clock& clock, int refusal_spike) : clock_(clock), refusal_spike_(refusal_spike) {
  // Families that exist before their first event, so a dashboard sees 0,
  // not nothing.
  for (const char* p : {"aws", "gcp", "azure"}) {
    metrics_.counter_add(kReleases, "Volume keys released, by platform.", {{"platform", p}}, 0);
  }
  metrics_.counter_add(kAuditFailures, "Audit records the trail could not take.", {}, 0);
  for (const char* s : {"pending", "approved", "denied", "expired"}) {
    metrics_.counter_add(kApprovals, "Approval requests made (pending) and decided, by state.", {{"state", s}}, 0);
  }
}

void Operations::released(const std::string& platform) {
  metrics_.counter_add(kReleases, "Volume keys released, by platform.", {{"platform", platform_label(platform)}});
}

void Operations::refused(const std::string& platform, const std::string& code) {
  metrics_.counter_add(kRefusals, "Requests refused or failed, by platform and reason (the API's error code).",
                       {{"platform", platform_label(platform)}, {"reason", code_label(code)}});
  if (refusal_spike_ <= 0) return;
  bool spike = false;
  int count = 0;
  {
    std::lock_guard<std::mutex> lock(spike_mu_);
    const int64_t minute = clock_.now_unix() / 60;
    if (minute != spike_minute_) {
      spike_minute_ = minute;
      spike_count_ = 0;
      spike_sent_ = false;
    }
    count = ++spike_count_;
    if (count >= refusal_spike_ && !spike_sent_) spike = spike_sent_ = true;  // once a minute
  }
  if (spike) {
    Json::Value f(Json::objectValue);
    f["refusals"] = count;
    f["window_seconds"] = 60;
    f["threshold"] = refusal_spike_;
    f["last_reason"] = code_label(code);
    notify("refusals.spike", std::move(f));
  }
}

void Operations::unlock_took(double seconds) {
  metrics_.observe(kUnlockSeconds, "Time an unlock request spent at the key service.", kLatencyBounds, {},
                   seconds);
}

void Operations::evidence_failed(const std::string& kind) {
  metrics_.counter_add(kEvidenceFailures, "Instance evidence that did not verify, by kind.",
                       {{"kind", kind == "tpm_quote" ? kind : platform_label(kind)}});
}

void Operations::store_took(const char* op, double seconds) {
  metrics_.observe(kStoreSeconds, "Time of the key service's store calls, by operation.", kLatencyBounds,
                   {{"op", op}}, seconds);
}

void Operations::audit_failed(const AuditEvent& e, const std::string& why) {
  metrics_.counter_add(kAuditFailures, "Audit records the trail could not take.", {});
  Json::Value f(Json::objectValue);
  f["event"] = e.event;
  f["outcome"] = e.outcome;
  f["volume_id"] = e.volume_id;
  f["error"] = why;
  notify("audit.write_failed", std::move(f));
}

void Operations::approval_requested(const Approval& a, int64_t now) {
  metrics_.counter_add(kApprovals, "Approval requests made (pending) and decided, by state.", {{"state", "pending"}});
  Json::Value f(Json::objectValue);
  f["request"] = a.to_json(now);
  notify("approval.requested", std::move(f));
}

void Operations::approval_decided(const Approval& d, bool approve, const std::string& who,
                                  const std::string& reason, int64_t now) {
  if (!approve || d.state == "approved") {
    metrics_.counter_add(kApprovals, "Approval requests made (pending) and decided, by state.",
                         {{"state", approve ? "approved" : "denied"}});
    metrics_.observe(kApprovalWait, "Time from an approval request to its decision.", kWaitBounds, {},
                     static_cast<double>(now - d.created_at));
  }
  Json::Value f(Json::objectValue);
  f["request"] = d.to_json(now);
  f["by"] = who;
  f["reason"] = reason;
  notify(approve ? "approval.approved" : "approval.denied", std::move(f));
}

void Operations::approval_expired(const Approval& a, int64_t now) {
  metrics_.counter_add(kApprovals, "Approval requests made (pending) and decided, by state.", {{"state", "expired"}});
  metrics_.observe(kApprovalWait, "Time from an approval request to its decision.", kWaitBounds, {},
                   static_cast<double>(now - a.created_at));
}

void Operations::webhook_outcome(const char* outcome) {
  metrics_.counter_add(kWebhook, "Webhook notifications, by outcome (delivered, failed, dropped).",
                       {{"outcome", outcome}});
}

std::string Operations::render(int64_t outstanding_nonces, int open_connections) {
  if (outstanding_nonces >= 0) {
    metrics_.gauge_set(kNonces, "Challenges issued and neither answered nor expired.", {},
                       static_cast<double>(outstanding_nonces));
  }
  metrics_.gauge_set(kConnections, "Connections open at this server process.", {},
                     static_cast<double>(open_connections));
  return metrics_.render();
}

void Operations::notify(const std::string& type, Json::Value fields) {
  if (webhook_) webhook_->notify(type, std::move(fields));
}

}  // namespace keygate::server
