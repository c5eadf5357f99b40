// The key store: volume records (secret sealed under the KEK), single-use
// nonces, enrollment tokens (only their hashes) and the audit trail, a hash
// chain: every write that appends events chains them onto the trail's head
// inside its own transaction.
// Store is the interface; SqliteStore is the embedded default, PgStore
// (server/pg_store.cc) the shared one for several replicas.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/encoding.h"
#include "core/status.h"

namespace keygate::server {

enum class VolumeState { kPending, kActive, kRevoked };
const char* volume_state_name(VolumeState s);
// The inverse of volume_state_name; kInternal for anything else (a store
// holding a state no server writes).
Result<VolumeState> parse_volume_state(const std::string& s);

struct VolumeRecord {
  std::string id;
  VolumeState state = VolumeState::kPending;
  std::string policy_json;
  Bytes sealed_secret;  // AES-256-GCM under the KEK, aad bound to the id
  std::string description;
  int64_t created_at = 0;
  int64_t updated_at = 0;
};

struct AuditEvent {
  int64_t time = 0;
  std::string event;    // "unlock", "enroll.register", "enroll.confirm", "revoke", ...
  std::string outcome;  // "released", "refused", "error", "ok"
  std::string volume_id;
  std::string peer;
  std::string detail;  // never a secret
};

// An event as the trail keeps it: numbered from 1 and chained (see
// server/audit_chain.h).
struct AuditRecord {
  int64_t seq = 0;
  AuditEvent event;
  Bytes prev_hash;  // the previous record's hash; 32 zero bytes for the first
  Bytes hash;
};

// A release waiting for people to approve it (server/approvals.h keeps
// what it says in `record`, JSON; the store indexes the rest).
struct ApprovalRecord {
  std::string id;
  std::string volume_id;
  std::string instance;  // the platform's instance claim
  std::string state;     // "pending", "approved", "denied", "expired", "used"
  std::string record;
  int64_t created_at = 0;
  int64_t expires_at = 0;
};

// A release that counts against a policy's max_releases: the releases of
// `instance` of `volume_id` at or after `since` are counted in the same
// transaction as the release's record; at `max` already, nothing is written
// (kRefused).
struct CountedRelease {
  std::string volume_id;
  std::string instance;
  int64_t now = 0;
  int64_t since = 0;
  int max = 0;
};

// A certificate of the admin CA (server/admin_ca.h) and who holds it.
struct AdminCertRecord {
  std::string serial;  // hex
  std::string name;
  std::string role;  // "viewer", "approver", "admin"
  std::string issued_by;
  int64_t issued_at = 0;
  int64_t expires_at = 0;
  int64_t revoked_at = 0;  // 0: in force
};

// One request's take from a shared token bucket (see Store::take_rate_token).
struct RateTake {
  bool allowed = true;
  bool burst_start = false;  // the first refusal since the key last got through
  int64_t retry_after_ms = 0;
};

// A policy file's text as a shared store keeps it: one version each load.
struct PolicyVersion {
  int64_t version = 0;
  std::string sha256;  // hex, of text
  std::string text;
  std::string loaded_by;
};

class Store {
 public:
  virtual ~Store() = default;

  // The policy in force, kept in the store, for a store several replicas
  // share: each load of a policy file is published as the newest version,
  // and every replica evaluates named policies under the newest; false:
  // each server's own file is in force for it alone.
  virtual bool shares_policy() const { return false; }
  // Records `p` (its version ignored) as the newest version with `event` on
  // the trail (its detail gains ", version N"), in one transaction; returns
  // its version number.
  virtual Result<int64_t> publish_policy(const PolicyVersion& p, const AuditEvent& event) {
    (void)p, (void)event;
    return Status::error(ErrorKind::kInternal, "this store keeps no policy");
  }
  // The newest version (version 0 and nothing else if none was published).
  virtual Result<PolicyVersion> latest_policy(bool with_text) {
    (void)with_text;
    return Status::error(ErrorKind::kInternal, "this store keeps no policy");
  }

  // Rate-limit buckets kept in the store, for a store several replicas
  // share (they must count one client together); false: each server counts
  // in its own memory (server/rate_limit.h).
  virtual bool shares_rate_limits() const { return false; }
  // Takes a token from bucket `key` (size `burst`, refilled at `per_second`
  // by the store's own clock), as RateLimiter::take decides.
  virtual Result<RateTake> take_rate_token(const std::string& key, double per_second,
                                           double burst) {
    (void)key, (void)per_second, (void)burst;
    return Status::error(ErrorKind::kInternal, "this store keeps no rate-limit buckets");
  }

  // Records a challenge nonce (and forgets those expired before `now`).
  // kUnavailable when too many challenges are outstanding.
  virtual Status put_nonce(const Bytes& nonce, int64_t now, int64_t expires_at) = 0;
  // Deletes the nonce; true only if it existed and had not expired at `now`.
  virtual Result<bool> consume_nonce(const Bytes& nonce, int64_t now) = 0;
  // Nonces issued and neither consumed nor expired at `now` (the metrics).
  virtual Result<int64_t> count_nonces(int64_t now) = 0;

  // The token (only its hash) and `event`, its record on the trail, in one
  // transaction: no token exists without its record.
  virtual Status create_enrollment_token(const Bytes& token_hash, const std::string& template_json,
                                         int64_t expires_at, int uses, const AuditEvent& event) = 0;
  // A live token's template JSON, no use spent; kRefused if unknown, used
  // up or expired.
  virtual Result<std::string> peek_enrollment_token(const Bytes& token_hash, int64_t now) = 0;
  // One enrollment, all or nothing, in one transaction: spends one use of
  // the token `token_hash` (null: enrollment by attestation, no token) if
  // it is still live at `now`, inserts `record` and appends `event`. A crash
  // or a failure at any point leaves none of the three. kRefused if the
  // token was used up or expired meanwhile.
  virtual Status record_enrollment(const Bytes* token_hash, int64_t now, const VolumeRecord& record,
                                   const AuditEvent& event) = 0;

  virtual Status insert_volume(const VolumeRecord& record) = 0;
  virtual Result<VolumeRecord> get_volume(const std::string& id) = 0;
  // Moves a volume from `from` to `to`; kConflict if it is not in `from`,
  // kNotFound if unknown.
  virtual Status transition_volume(const std::string& id, VolumeState from, VolumeState to,
                                   int64_t now) = 0;
  // Revokes a volume that is in `from` and appends `event` to the trail in
  // one transaction: both or neither. kConflict if it is not in `from`,
  // kNotFound if unknown.
  virtual Status revoke_volume(const std::string& id, VolumeState from, int64_t now,
                               const AuditEvent& event) = 0;
  // Replaces a volume's policy only if it is still `expected` (a
  // compare-and-swap, so a one-shot change is used once); kConflict if it
  // changed meanwhile, kNotFound if unknown.
  virtual Status update_volume_policy(const std::string& id, const std::string& expected,
                                      const std::string& updated, int64_t now) = 0;
  virtual Result<std::vector<VolumeRecord>> list_volumes() = 0;
  // Revokes every pending volume created before `created_before`, each with
  // `event` on the audit trail (its volume_id set), in one transaction;
  // returns their ids.
  virtual Result<std::vector<std::string>> expire_pending(int64_t created_before, int64_t now,
                                                          const AuditEvent& event) = 0;

  // Approval requests. Each change is a compare-and-swap on the whole
  // request (state and record) with its event on the audit trail, in one
  // transaction: kConflict if it changed meanwhile, kNotFound if unknown.
  virtual Status insert_approval(const ApprovalRecord& record, const AuditEvent& event) = 0;
  virtual Result<ApprovalRecord> get_approval(const std::string& id) = 0;
  // The newest pending request of `instance` for `volume_id`, if any.
  virtual Result<std::optional<ApprovalRecord>> find_pending_approval(const std::string& volume_id,
                                                                      const std::string& instance) = 0;
  // Newest first; only pending ones if `pending_only`.
  virtual Result<std::vector<ApprovalRecord>> list_approvals(bool pending_only, int limit) = 0;
  // With `count`, the release it records (event) is counted as well.
  virtual Status update_approval(const ApprovalRecord& expected, const ApprovalRecord& updated,
                                 const AuditEvent& event, const CountedRelease* count = nullptr) = 0;
  // A release's audit record, counted (see CountedRelease), in one
  // transaction: kRefused, and nothing written, when the limit is reached.
  virtual Status record_counted_release(const CountedRelease& count, const AuditEvent& event) = 0;

  // Admin certificates: issued (a serial is recorded once) and revoked,
  // each with its event, in one transaction.
  virtual Status insert_admin_cert(const AdminCertRecord& record, const AuditEvent& event) = 0;
  virtual Result<AdminCertRecord> get_admin_cert(const std::string& serial) = 0;
  virtual Result<std::vector<AdminCertRecord>> list_admin_certs() = 0;
  // kNotFound if unknown, kConflict if already revoked.
  virtual Status revoke_admin_cert(const std::string& serial, int64_t now, const AuditEvent& event) = 0;

  virtual Status append_audit(const AuditEvent& event) = 0;
  virtual Result<std::vector<AuditEvent>> recent_audit(int limit) = 0;
  // Up to `limit` records with seq > `after_seq`, in order, as stored (a
  // tampered record is returned as it is, for the verifier to find).
  virtual Result<std::vector<AuditRecord>> read_audit(int64_t after_seq, int limit) = 0;
};

// Opens (creating if needed) the SQLite store at `path`, file mode 0600.
Result<std::unique_ptr<Store>> open_sqlite_store(const std::string& path);

// Everything a store holds, as stored (for `keygate-server migrate-store`).
// Challenge nonces are not in it: they live seconds.
struct StoreDump {
  struct Token {
    Bytes token_hash;
    std::string template_json;
    int64_t expires_at = 0;
    int64_t uses_left = 0;
  };
  struct Release {
    std::string volume_id;
    std::string instance;
    int64_t time = 0;
  };
  std::vector<VolumeRecord> volumes;
  std::vector<Token> tokens;
  std::vector<ApprovalRecord> approvals;
  std::vector<Release> releases;
  std::vector<AdminCertRecord> admin_certs;
  std::vector<AuditRecord> audit;  // in order, hashes as stored
  int64_t audit_last_seq = 0;      // the highest number ever given
};

// A consistent copy of the SQLite store at `path` (one read transaction).
Result<StoreDump> dump_sqlite_store(const std::string& path);

// Writes `dump` into the PostgreSQL database `conninfo` names (its schema
// made or migrated first), then chains `event` onto the copied trail: all
// in one transaction. kConflict, and nothing written, if the database holds
// any volume, token, approval, admin certificate or audit record already.
Status load_postgres_store(const std::string& conninfo, const StoreDump& dump,
                           const AuditEvent& event);

// kInvalidArgument if `conninfo` is not a PostgreSQL connection string
// (key=value pairs or a postgresql:// URI) or holds a password: a password
// belongs in a password file or a service file, not in a string that
// reaches command lines and configuration files.
Status check_postgres_conninfo(const std::string& conninfo);

// Connects to the PostgreSQL database `conninfo` names, with at most
// `connections` connections at once, and brings its schema to this
// server's version (in one transaction; a database of a newer schema is
// refused with kInvalidArgument). The database must exist.
Result<std::unique_ptr<Store>> open_postgres_store(const std::string& conninfo,
                                                   int connections = 8);

}  // namespace keygate::server
