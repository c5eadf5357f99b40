// An in-memory Store for fast unit tests of KeyService, with failures that
// can be injected per operation. It keeps the contract of server/store.h
// (tests/store_test.cc runs the same contract cases on it and on SQLite).
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "server/store.h"

namespace keygate::server {

class MemoryStore final : public Store {
 public:
  enum class Op {
    kPutNonce,
    kConsumeNonce,
    kCreateToken,
    kPeekToken,
    kRecordEnrollment,  // also fails where kInsertVolume or kAppendAudit is set
    kInsertVolume,
    kGetVolume,
    kTransitionVolume,
    kUpdatePolicy,
    kListVolumes,
    kExpirePending,
    kAppendAudit,
    kRecentAudit,  // also read_audit
    kApprovals,    // every approval call
    kAdminCerts,   // every admin certificate call
  };
  // Every later call of `op` fails with `status`; Status::ok() clears it.
  void fail(Op op, Status status);
  size_t max_outstanding_nonces = 200000;

  Status put_nonce(const Bytes& nonce, int64_t now, int64_t expires_at) override;
  Result<bool> consume_nonce(const Bytes& nonce, int64_t now) override;
  Result<int64_t> count_nonces(int64_t now) override;
  Status create_enrollment_token(const Bytes& token_hash, const std::string& template_json,
                                 int64_t expires_at, int uses, const AuditEvent& event) override;
  Result<std::string> peek_enrollment_token(const Bytes& token_hash, int64_t now) override;
  Status record_enrollment(const Bytes* token_hash, int64_t now, const VolumeRecord& record,
                           const AuditEvent& event) override;
  Status insert_volume(const VolumeRecord& record) override;
  Result<VolumeRecord> get_volume(const std::string& id) override;
  Status transition_volume(const std::string& id, VolumeState from, VolumeState to,
                           int64_t now) override;
  Status revoke_volume(const std::string& id, VolumeState from, int64_t now,
                       const AuditEvent& event) override;
  Status update_volume_policy(const std::string& id, const std::string& expected,
                              const std::string& updated, int64_t now) override;
  Result<std::vector<VolumeRecord>> list_volumes() override;
  Result<std::vector<std::string>> expire_pending(int64_t created_before, int64_t now,
                                                  const AuditEvent& event) override;
  Status insert_approval(const ApprovalRecord& record, const AuditEvent& event) override;
  Result<ApprovalRecord> get_approval(const std::string& id) override;
  Result<std::optional<ApprovalRecord>> find_pending_approval(const std::string& volume_id,
                                                              const std::string& instance) override;
  Result<std::vector<ApprovalRecord>> list_approvals(bool pending_only, int limit) override;
  Status update_approval(const ApprovalRecord& expected, const ApprovalRecord& updated,
                         const AuditEvent& event, const CountedRelease* count = nullptr) override;
  Status record_counted_release(const CountedRelease& count, const AuditEvent& event) override;
  Status insert_admin_cert(const AdminCertRecord& record, const AuditEvent& event) override;
  Result<AdminCertRecord> get_admin_cert(const std::string& serial) override;
  Result<std::vector<AdminCertRecord>> list_admin_certs() override;
  Status revoke_admin_cert(const std::string& serial, int64_t now, const AuditEvent& event) override;
  Status append_audit(const AuditEvent& event) override;
  Result<std::vector<AuditEvent>> recent_audit(int limit) override;
  Result<std::vector<AuditRecord>> read_audit(int64_t after_seq, int limit) override;

 private:
  Status injected(Op op);
  void push_audit_locked(const AuditEvent& event);  // mu_ held
  Status transition_locked(const std::string& id, VolumeState from, VolumeState to,
                           int64_t now);  // mu_ held

  struct Token {
    std::string template_json;
    int64_t expires_at;
    int uses_left;
  };
  std::mutex mu_;
  std::map<Op, Status> failures_;
  std::map<Bytes, int64_t> nonces_;
  std::map<Bytes, Token> tokens_;
  std::map<std::string, VolumeRecord> volumes_;
  std::vector<std::string> volume_order_;
  std::vector<AuditRecord> audit_;
  std::vector<ApprovalRecord> approvals_;  // in creation order
  std::map<std::string, AdminCertRecord> admin_certs_;
  std::map<std::pair<std::string, std::string>, std::vector<int64_t>> releases_;  // (volume, instance) -> times
  // Checks and, if under the limit, records `count` (mu_ held).
  Status count_release_locked(const CountedRelease& count);
};

}  // namespace keygate::server
