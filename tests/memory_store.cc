#include "tests/memory_store.h"

#include <algorithm>

#include "server/audit_chain.h"

namespace keygate::server {

void MemoryStore::fail(Op op, Status status) {
  std::lock_guard<std::mutex> lock(mu_);
  if (status.is_ok()) {
    failures_.erase(op);
  } else {
    failures_[op] = std::move(status);
  }
}

Status MemoryStore::injected(Op op) {
  auto it = failures_.find(op);
  return it == failures_.end() ? Status::ok() : it->second;
}

Status MemoryStore::put_nonce(const Bytes& nonce, int64_t now, int64_t expires_at) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kPutNonce));
  for (auto it = nonces_.begin(); it != nonces_.end();) {
    it = it->second < now ? nonces_.erase(it) : std::next(it);
  }
  if (nonces_.size() >= max_outstanding_nonces) {
    return Status::error(ErrorKind::kUnavailable, "too many outstanding challenges");
  }
  if (!nonces_.emplace(nonce, expires_at).second) {
    return Status::error(ErrorKind::kIo, "store: insert nonce: not unique");
  }
  return Status::ok();
}

Result<bool> MemoryStore::consume_nonce(const Bytes& nonce, int64_t now) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kConsumeNonce));
  auto it = nonces_.find(nonce);
  if (it == nonces_.end()) return false;
  const bool fresh = now <= it->second;
  nonces_.erase(it);
  return fresh;
}

Result<int64_t> MemoryStore::count_nonces(int64_t now) {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t n = 0;
  for (const auto& [nonce, expires_at] : nonces_) n += expires_at >= now ? 1 : 0;
  return n;
}

Status MemoryStore::create_enrollment_token(const Bytes& token_hash, const std::string& template_json,
                                            int64_t expires_at, int uses, const AuditEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kCreateToken));
  KEYGATE_RETURN_IF_ERROR(injected(Op::kAppendAudit));
  if (!tokens_.emplace(token_hash, Token{template_json, expires_at, uses}).second) {
    return Status::error(ErrorKind::kIo, "store: insert enrollment token: not unique");
  }
  push_audit_locked(event);
  return Status::ok();
}

Result<std::string> MemoryStore::peek_enrollment_token(const Bytes& token_hash, int64_t now) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kPeekToken));
  auto it = tokens_.find(token_hash);
  if (it == tokens_.end() || it->second.uses_left <= 0 || it->second.expires_at < now) {
    return Status::error(ErrorKind::kRefused, "enrollment token unknown, used up or expired");
  }
  return it->second.template_json;
}

Status MemoryStore::record_enrollment(const Bytes* token_hash, int64_t now, const VolumeRecord& record,
                                      const AuditEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  // Every check first, then every change: all or nothing.
  for (Op op : {Op::kRecordEnrollment, Op::kInsertVolume, Op::kAppendAudit}) {
    KEYGATE_RETURN_IF_ERROR(injected(op));
  }
  Token* token = nullptr;
  if (token_hash != nullptr) {
    auto it = tokens_.find(*token_hash);
    if (it == tokens_.end() || it->second.uses_left <= 0 || it->second.expires_at < now) {
      return Status::error(ErrorKind::kRefused, "enrollment token unknown, used up or expired");
    }
    token = &it->second;
  }
  if (volumes_.count(record.id) != 0) return Status::error(ErrorKind::kIo, "store: insert volume: not unique");
  if (token != nullptr) --token->uses_left;
  volumes_.emplace(record.id, record);
  volume_order_.push_back(record.id);
  push_audit_locked(event);
  return Status::ok();
}

Status MemoryStore::insert_volume(const VolumeRecord& record) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kInsertVolume));
  if (!volumes_.emplace(record.id, record).second) {
    return Status::error(ErrorKind::kIo, "store: insert volume: not unique");
  }
  volume_order_.push_back(record.id);
  return Status::ok();
}

Result<VolumeRecord> MemoryStore::get_volume(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kGetVolume));
  auto it = volumes_.find(id);
  if (it == volumes_.end()) return Status::error(ErrorKind::kNotFound, str_cat("no volume ", id));
  return it->second;
}

Status MemoryStore::transition_volume(const std::string& id, VolumeState from, VolumeState to,
                                      int64_t now) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kTransitionVolume));
  return transition_locked(id, from, to, now);
}

Status MemoryStore::revoke_volume(const std::string& id, VolumeState from, int64_t now,
                                  const AuditEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kTransitionVolume));
  KEYGATE_RETURN_IF_ERROR(injected(Op::kAppendAudit));  // nothing changes without its record
  KEYGATE_RETURN_IF_ERROR(transition_locked(id, from, VolumeState::kRevoked, now));
  push_audit_locked(event);
  return Status::ok();
}

Status MemoryStore::transition_locked(const std::string& id, VolumeState from, VolumeState to,
                                      int64_t now) {
  auto it = volumes_.find(id);
  if (it == volumes_.end()) return Status::error(ErrorKind::kNotFound, str_cat("no volume ", id));
  if (it->second.state != from) {
    return Status::error(ErrorKind::kConflict, str_cat("volume ", id, " is ",
                                                       volume_state_name(it->second.state), ", not ",
                                                       volume_state_name(from)));
  }
  it->second.state = to;
  it->second.updated_at = now;
  return Status::ok();
}

Status MemoryStore::update_volume_policy(const std::string& id, const std::string& expected,
                                         const std::string& updated, int64_t now) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kUpdatePolicy));
  auto it = volumes_.find(id);
  if (it == volumes_.end()) return Status::error(ErrorKind::kNotFound, str_cat("no volume ", id));
  if (it->second.policy_json != expected) {
    return Status::error(ErrorKind::kConflict, str_cat("volume ", id, ": policy changed meanwhile"));
  }
  it->second.policy_json = updated;
  it->second.updated_at = now;
  return Status::ok();
}

Result<std::vector<VolumeRecord>> MemoryStore::list_volumes() {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kListVolumes));
  std::vector<VolumeRecord> out;
  for (const auto& id : volume_order_) out.push_back(volumes_.at(id));
  std::stable_sort(out.begin(), out.end(), [](const VolumeRecord& a, const VolumeRecord& b) {
    return a.created_at != b.created_at ? a.created_at < b.created_at : a.id < b.id;
  });
  return out;
}

Result<std::vector<std::string>> MemoryStore::expire_pending(int64_t created_before, int64_t now,
                                                             const AuditEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kExpirePending));
  KEYGATE_RETURN_IF_ERROR(injected(Op::kAppendAudit));
  std::vector<std::string> ids;
  for (const auto& id : volume_order_) {
    VolumeRecord& v = volumes_.at(id);
    if (v.state != VolumeState::kPending || v.created_at >= created_before) continue;
    v.state = VolumeState::kRevoked;
    v.updated_at = now;
    AuditEvent e = event;
    e.volume_id = id;
    push_audit_locked(e);
    ids.push_back(id);
  }
  return ids;
}

Status MemoryStore::insert_approval(const ApprovalRecord& record, const AuditEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kApprovals));
  KEYGATE_RETURN_IF_ERROR(injected(Op::kAppendAudit));
  for (const ApprovalRecord& r : approvals_) {
    if (r.id == record.id) return Status::error(ErrorKind::kIo, "store: insert approval: not unique");
  }
  approvals_.push_back(record);
  push_audit_locked(event);
  return Status::ok();
}

Result<ApprovalRecord> MemoryStore::get_approval(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kApprovals));
  for (const ApprovalRecord& r : approvals_) {
    if (r.id == id) return r;
  }
  return Status::error(ErrorKind::kNotFound, str_cat("no approval request ", id));
}

Result<std::optional<ApprovalRecord>> MemoryStore::find_pending_approval(const std::string& volume_id,
                                                                         const std::string& instance) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kApprovals));
  for (auto it = approvals_.rbegin(); it != approvals_.rend(); ++it) {
    if (it->volume_id == volume_id && it->instance == instance && it->state == "pending") {
      return std::optional<ApprovalRecord>(*it);
    }
  }
  return std::optional<ApprovalRecord>();
}

Result<std::vector<ApprovalRecord>> MemoryStore::list_approvals(bool pending_only, int limit) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kApprovals));
  std::vector<ApprovalRecord> out;
  for (auto it = approvals_.rbegin(); it != approvals_.rend() && out.size() < static_cast<size_t>(std::max(limit, 0)); ++it) {
    if (!pending_only || it->state == "pending") out.push_back(*it);
  }
  return out;
}

Status MemoryStore::count_release_locked(const CountedRelease& count) {
  std::vector<int64_t>& times = releases_[{count.volume_id, count.instance}];
  times.erase(std::remove_if(times.begin(), times.end(), [&](int64_t t) { return t < count.since; }), times.end());
  if (static_cast<int64_t>(times.size()) >= count.max) {
    return Status::error(ErrorKind::kRefused, str_cat(times.size(), " releases to instance ", count.instance,
                                                      " within the period already (at most ", count.max, ")"));
  }
  times.push_back(count.now);
  return Status::ok();
}

Status MemoryStore::record_counted_release(const CountedRelease& count, const AuditEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kAppendAudit));
  KEYGATE_RETURN_IF_ERROR(count_release_locked(count));
  push_audit_locked(event);
  return Status::ok();
}

Status MemoryStore::update_approval(const ApprovalRecord& expected, const ApprovalRecord& updated,
                                    const AuditEvent& event, const CountedRelease* count) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kApprovals));
  KEYGATE_RETURN_IF_ERROR(injected(Op::kAppendAudit));
  for (ApprovalRecord& r : approvals_) {
    if (r.id != expected.id) continue;
    if (r.state != expected.state || r.record != expected.record) {
      return Status::error(ErrorKind::kConflict, str_cat("approval request ", expected.id, " changed meanwhile"));
    }
    if (count != nullptr) KEYGATE_RETURN_IF_ERROR(count_release_locked(*count));
    r.state = updated.state;
    r.record = updated.record;
    push_audit_locked(event);
    return Status::ok();
  }
  return Status::error(ErrorKind::kNotFound, str_cat("no approval request ", expected.id));
}

Status MemoryStore::insert_admin_cert(const AdminCertRecord& record, const AuditEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kAdminCerts));
  KEYGATE_RETURN_IF_ERROR(injected(Op::kAppendAudit));
  if (!admin_certs_.emplace(record.serial, record).second) {
    return Status::error(ErrorKind::kIo, "store: insert admin certificate: not unique");
  }
  push_audit_locked(event);
  return Status::ok();
}

Result<AdminCertRecord> MemoryStore::get_admin_cert(const std::string& serial) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kAdminCerts));
  auto it = admin_certs_.find(serial);
  if (it == admin_certs_.end()) return Status::error(ErrorKind::kNotFound, str_cat("no admin certificate ", serial));
  return it->second;
}

Result<std::vector<AdminCertRecord>> MemoryStore::list_admin_certs() {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kAdminCerts));
  std::vector<AdminCertRecord> out;
  for (const auto& [serial, r] : admin_certs_) out.push_back(r);
  std::stable_sort(out.begin(), out.end(), [](const AdminCertRecord& a, const AdminCertRecord& b) {
    return a.issued_at != b.issued_at ? a.issued_at < b.issued_at : a.serial < b.serial;
  });
  return out;
}

Status MemoryStore::revoke_admin_cert(const std::string& serial, int64_t now, const AuditEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kAdminCerts));
  KEYGATE_RETURN_IF_ERROR(injected(Op::kAppendAudit));
  auto it = admin_certs_.find(serial);
  if (it == admin_certs_.end()) return Status::error(ErrorKind::kNotFound, str_cat("no admin certificate ", serial));
  if (it->second.revoked_at != 0) {
    return Status::error(ErrorKind::kConflict, str_cat("admin certificate ", serial, " is already revoked"));
  }
  it->second.revoked_at = now;
  push_audit_locked(event);
  return Status::ok();
}

Status MemoryStore::append_audit(const AuditEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kAppendAudit));
  push_audit_locked(event);
  return Status::ok();
}

Result<std::vector<AuditEvent>> MemoryStore::recent_audit(int limit) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kRecentAudit));
  const size_t n = std::min(audit_.size(), static_cast<size_t>(std::max(limit, 0)));
  std::vector<AuditEvent> out;
  for (size_t i = audit_.size() - n; i < audit_.size(); ++i) out.push_back(audit_[i].event);
  return out;
}

Result<std::vector<AuditRecord>> MemoryStore::read_audit(int64_t after_seq, int limit) {
  std::lock_guard<std::mutex> lock(mu_);
  KEYGATE_RETURN_IF_ERROR(injected(Op::kRecentAudit));
  std::vector<AuditRecord> out;
  for (const AuditRecord& r : audit_) {
    if (r.seq > after_seq && out.size() < static_cast<size_t>(std::max(limit, 0))) out.push_back(r);
  }
  return out;
}

void MemoryStore::push_audit_locked(const AuditEvent& event) {
  const AuditRecord* head = audit_.empty() ? nullptr : &audit_.back();
  audit_.push_back(chain_audit_record(head, head == nullptr ? 1 : head->seq + 1, event));
}

}  // namespace keygate::server
