#include <sqlite3.h>
#include <sys/stat.h>

#include <algorithm>
#include <ctime>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "server/audit_chain.h"
#include "server/group_commit.h"
#include "server/store.h"

namespace keygate::server {

const char* volume_state_name(VolumeState s) {
  switch (s) {
    case VolumeState::kPending:
      return "pending";
    case VolumeState::kActive:
      return "active";
    case VolumeState::kRevoked:
      return "revoked";
  }
  return "unknown";
}

Result<VolumeState> parse_volume_state(const std::string& s) {
  if (s == "pending") return VolumeState::kPending;
  if (s == "active") return VolumeState::kActive;
  if (s == "revoked") return VolumeState::kRevoked;
  return Status::error(ErrorKind::kInternal, str_cat("store: unknown volume state '", s, "'"));
}

namespace {

constexpr char kSchema[] = R"sql(
CREATE TABLE IF NOT EXISTS volumes (
  id TEXT PRIMARY KEY,
  state TEXT NOT NULL,
  policy TEXT NOT NULL,
  sealed_secret BLOB NOT NULL,
  description TEXT NOT NULL DEFAULT '',
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
  token_hash BLOB PRIMARY KEY,
  template TEXT NOT NULL,
  expires_at INTEGER NOT NULL,
  uses_left INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  time INTEGER NOT NULL,
  event TEXT NOT NULL,
  outcome TEXT NOT NULL,
  volume_id TEXT NOT NULL,
  peer TEXT NOT NULL,
  detail TEXT NOT NULL,
  prev_hash BLOB NOT NULL DEFAULT x'',
  hash BLOB NOT NULL DEFAULT x''
);
CREATE TABLE IF NOT EXISTS approvals (
  id TEXT PRIMARY KEY,
  volume_id TEXT NOT NULL,
  instance TEXT NOT NULL,
  state TEXT NOT NULL,
  record TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS approvals_by_instance ON approvals(volume_id, instance, state);
CREATE TABLE IF NOT EXISTS releases (
  volume_id TEXT NOT NULL,
  instance TEXT NOT NULL,
  time INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS releases_by_instance ON releases(volume_id, instance, time);
CREATE TABLE IF NOT EXISTS admin_certs (
  serial TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  role TEXT NOT NULL,
  issued_by TEXT NOT NULL,
  issued_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  revoked_at INTEGER NOT NULL DEFAULT 0
);
)sql";

// A trail written before the hash chain gains its two columns; its records
// are chained as they are found, in one transaction with that change.
constexpr char kAddChainColumns[] =
    "ALTER TABLE audit ADD COLUMN prev_hash BLOB NOT NULL DEFAULT x''; "
    "ALTER TABLE audit ADD COLUMN hash BLOB NOT NULL DEFAULT x'';";

// The store's prepared statements, each compiled once: parsing the SQL
// again for every request cost more than running it. Used under the store's
// lock only.
class StmtCache {
 public:
  explicit StmtCache(sqlite3* db) : db_(db) {}
  ~StmtCache() { clear(); }
  StmtCache(const StmtCache&) = delete;
  StmtCache& operator=(const StmtCache&) = delete;

  // The statement for `sql` (a string literal: its address is the key), or
  // nullptr if it does not compile.
  sqlite3_stmt* get(const char* sql) {
    auto it = cache_.find(sql);
    if (it != cache_.end()) return it->second;
    sqlite3_stmt* stmt = nullptr;
    if (sqlite3_prepare_v3(db_, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt, nullptr) != SQLITE_OK) {
      sqlite3_finalize(stmt);
      return nullptr;
    }
    cache_.emplace(sql, stmt);
    return stmt;
  }
  void clear() {
    for (auto& [sql, stmt] : cache_) sqlite3_finalize(stmt);
    cache_.clear();
  }

 private:
  sqlite3* db_;
  std::unordered_map<const char*, sqlite3_stmt*> cache_;
};

// One use of a cached statement: reset, and its bindings cleared, when done.
class Stmt {
 public:
  Stmt(StmtCache& cache, const char* sql) : stmt_(cache.get(sql)) {}
  ~Stmt() {
    if (stmt_ != nullptr) {
      sqlite3_reset(stmt_);
      sqlite3_clear_bindings(stmt_);
    }
  }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;
  bool ok() const { return stmt_ != nullptr; }
  sqlite3_stmt* get() { return stmt_; }
  void bind(int i, const std::string& s) {
    sqlite3_bind_text(stmt_, i, s.data(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
  }
  void bind(int i, const Bytes& b) {
    sqlite3_bind_blob(stmt_, i, b.data(), static_cast<int>(b.size()), SQLITE_TRANSIENT);
  }
  void bind(int i, int64_t v) { sqlite3_bind_int64(stmt_, i, v); }
  int step() { return sqlite3_step(stmt_); }
  std::string text(int col) {
    const unsigned char* t = sqlite3_column_text(stmt_, col);
    return t ? std::string(reinterpret_cast<const char*>(t),
                           static_cast<size_t>(sqlite3_column_bytes(stmt_, col)))
             : std::string();
  }
  Bytes blob(int col) {
    const uint8_t* p = static_cast<const uint8_t*>(sqlite3_column_blob(stmt_, col));
    int n = sqlite3_column_bytes(stmt_, col);
    return p ? Bytes(p, p + n) : Bytes();
  }
  int64_t integer(int col) { return sqlite3_column_int64(stmt_, col); }

 private:
  sqlite3_stmt* stmt_ = nullptr;
};

// Rows as the stores' records (columns in the order the queries name them).
ApprovalRecord read_approval(Stmt& s) {
  return ApprovalRecord{s.text(0), s.text(1),    s.text(2),   s.text(3),
                        s.text(4), s.integer(5), s.integer(6)};
}
AdminCertRecord read_admin_cert(Stmt& s) {
  return AdminCertRecord{s.text(0),    s.text(1),    s.text(2),   s.text(3),
                         s.integer(4), s.integer(5), s.integer(6)};
}
Result<VolumeRecord> read_volume(Stmt& s) {
  auto state = parse_volume_state(s.text(1));
  if (!state.is_ok()) return state.status();
  return VolumeRecord{s.text(0), state.value(), s.text(2),   s.blob(3),
                      s.text(4), s.integer(5),  s.integer(6)};
}

// Challenge nonces live only in this process's memory, not in the
// database: they are short-lived and single-use, need no durability (a
// restarted server's clients ask again), and a table of their own, under a
// lock of its own, means a challenge never waits for an audit commit's fsync.
class NonceTable {
 public:
  // Bounds the memory a flood of challenge requests can take.
  static constexpr size_t kMaxOutstanding = 200000;

  Status put(const Bytes& nonce, int64_t now, int64_t expires_at) {
    std::lock_guard<std::mutex> lock(mu_);
    // Expired nonces are forgotten as new ones are recorded.
    while (!by_expiry_.empty() && by_expiry_.begin()->first < now) {
      live_.erase(by_expiry_.begin()->second);
      by_expiry_.erase(by_expiry_.begin());
    }
    if (live_.size() >= kMaxOutstanding) {
      return Status::error(ErrorKind::kUnavailable, "too many outstanding challenges");
    }
    std::string key(nonce.begin(), nonce.end());
    if (live_.count(key) != 0)
      return Status::error(ErrorKind::kInternal, "challenge nonce issued twice");
    live_.emplace(key, by_expiry_.emplace(expires_at, key));
    return Status::ok();
  }

  // True once for a nonce issued and not yet expired at `now`.
  bool consume(const Bytes& nonce, int64_t now) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(std::string(nonce.begin(), nonce.end()));
    if (it == live_.end()) return false;
    const int64_t expires_at = it->second->first;
    by_expiry_.erase(it->second);
    live_.erase(it);
    return now <= expires_at;
  }

  int64_t count(int64_t now) {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t n = 0;
    for (auto it = by_expiry_.lower_bound(now); it != by_expiry_.end(); ++it) ++n;
    return n;
  }

 private:
  std::mutex mu_;
  std::multimap<int64_t, std::string> by_expiry_;
  std::unordered_map<std::string, std::multimap<int64_t, std::string>::iterator> live_;
};

class SqliteStore final : public Store {
 public:
  explicit SqliteStore(sqlite3* db) : db_(db), stmts_(db) {}
  ~SqliteStore() override {
    stmts_.clear();  // a database with statements left open does not close
    sqlite3_close(db_);
  }

  Status put_nonce(const Bytes& nonce, int64_t now, int64_t expires_at) override {
    return nonces_.put(nonce, now, expires_at);
  }

  Result<bool> consume_nonce(const Bytes& nonce, int64_t now) override {
    return nonces_.consume(nonce, now);
  }

  Result<int64_t> count_nonces(int64_t now) override { return nonces_.count(now); }

  Status create_enrollment_token(const Bytes& token_hash, const std::string& template_json,
                                 int64_t expires_at, int uses, const AuditEvent& event) override {
    std::lock_guard<std::mutex> lock(mu_);
    return in_transaction("enrollment token", [&]() -> Status {
      Stmt s(stmts_,
             "INSERT INTO enrollment_tokens(token_hash, template, expires_at, uses_left) "
             "VALUES(?, ?, ?, ?)");
      if (!s.ok()) return db_error("prepare token insert");
      s.bind(1, token_hash);
      s.bind(2, template_json);
      s.bind(3, expires_at);
      s.bind(4, static_cast<int64_t>(uses));
      if (s.step() != SQLITE_DONE) return db_error("insert enrollment token");
      return insert_audit_locked(event);
    });
  }

  Result<std::string> peek_enrollment_token(const Bytes& token_hash, int64_t now) override {
    std::lock_guard<std::mutex> lock(mu_);
    Stmt s(stmts_,
           "SELECT template FROM enrollment_tokens "
           "WHERE token_hash = ? AND uses_left > 0 AND expires_at >= ?");
    if (!s.ok()) return db_error("prepare token select");
    s.bind(1, token_hash);
    s.bind(2, now);
    int rc = s.step();
    if (rc == SQLITE_DONE) {
      return Status::error(ErrorKind::kRefused, "enrollment token unknown, used up or expired");
    }
    if (rc != SQLITE_ROW) return db_error("select enrollment token");
    return s.text(0);
  }

  Status record_enrollment(const Bytes* token_hash, int64_t now, const VolumeRecord& record,
                           const AuditEvent& event) override {
    std::lock_guard<std::mutex> lock(mu_);
    return in_transaction("enrollment", [&]() -> Status {
      if (token_hash != nullptr) {
        Stmt s(stmts_,
               "UPDATE enrollment_tokens SET uses_left = uses_left - 1 "
               "WHERE token_hash = ? AND uses_left > 0 AND expires_at >= ?");
        if (!s.ok()) return db_error("prepare token use");
        s.bind(1, *token_hash);
        s.bind(2, now);
        if (s.step() != SQLITE_DONE) return db_error("use enrollment token");
        if (sqlite3_changes(db_) != 1) {
          return Status::error(ErrorKind::kRefused, "enrollment token unknown, used up or expired");
        }
      }
      KEYGATE_RETURN_IF_ERROR(insert_volume_locked(record));
      return insert_audit_locked(event);
    });
  }

  Status insert_volume(const VolumeRecord& r) override {
    std::lock_guard<std::mutex> lock(mu_);
    return insert_volume_locked(r);
  }

  Status insert_volume_locked(const VolumeRecord& r) {
    Stmt s(stmts_,
           "INSERT INTO volumes(id, state, policy, sealed_secret, description, created_at, "
           "updated_at) VALUES(?, ?, ?, ?, ?, ?, ?)");
    if (!s.ok()) return db_error("prepare volume insert");
    s.bind(1, r.id);
    s.bind(2, std::string(volume_state_name(r.state)));
    s.bind(3, r.policy_json);
    s.bind(4, r.sealed_secret);
    s.bind(5, r.description);
    s.bind(6, r.created_at);
    s.bind(7, r.updated_at);
    if (s.step() != SQLITE_DONE) return db_error("insert volume");
    return Status::ok();
  }

  Result<VolumeRecord> get_volume(const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    Stmt s(stmts_,
           "SELECT id, state, policy, sealed_secret, description, created_at, updated_at "
           "FROM volumes WHERE id = ?");
    if (!s.ok()) return db_error("prepare volume select");
    s.bind(1, id);
    int rc = s.step();
    if (rc == SQLITE_DONE) {
      return Status::error(ErrorKind::kNotFound, str_cat("no volume ", id));
    }
    if (rc != SQLITE_ROW) return db_error("select volume");
    return read_volume(s);
  }

  Status transition_volume(const std::string& id, VolumeState from, VolumeState to,
                           int64_t now) override {
    std::lock_guard<std::mutex> lock(mu_);
    return transition_locked(id, from, to, now);
  }

  Status revoke_volume(const std::string& id, VolumeState from, int64_t now,
                       const AuditEvent& event) override {
    std::lock_guard<std::mutex> lock(mu_);
    return in_transaction("revocation", [&]() -> Status {
      KEYGATE_RETURN_IF_ERROR(transition_locked(id, from, VolumeState::kRevoked, now));
      return insert_audit_locked(event);
    });
  }

  // mu_ held.
  Status transition_locked(const std::string& id, VolumeState from, VolumeState to, int64_t now) {
    Stmt s(stmts_, "UPDATE volumes SET state = ?, updated_at = ? WHERE id = ? AND state = ?");
    if (!s.ok()) return db_error("prepare transition");
    s.bind(1, std::string(volume_state_name(to)));
    s.bind(2, now);
    s.bind(3, id);
    s.bind(4, std::string(volume_state_name(from)));
    if (s.step() != SQLITE_DONE) return db_error("update volume state");
    if (sqlite3_changes(db_) == 1) return Status::ok();
    Stmt q(stmts_, "SELECT state FROM volumes WHERE id = ?");
    q.bind(1, id);
    if (q.step() != SQLITE_ROW) {
      return Status::error(ErrorKind::kNotFound, str_cat("no volume ", id));
    }
    return Status::error(ErrorKind::kConflict, str_cat("volume ", id, " is ", q.text(0), ", not ",
                                                       volume_state_name(from)));
  }

  Status update_volume_policy(const std::string& id, const std::string& expected,
                              const std::string& updated, int64_t now) override {
    std::lock_guard<std::mutex> lock(mu_);
    Stmt s(stmts_, "UPDATE volumes SET policy = ?, updated_at = ? WHERE id = ? AND policy = ?");
    if (!s.ok()) return db_error("prepare policy update");
    s.bind(1, updated);
    s.bind(2, now);
    s.bind(3, id);
    s.bind(4, expected);
    if (s.step() != SQLITE_DONE) return db_error("update volume policy");
    if (sqlite3_changes(db_) == 1) return Status::ok();
    Stmt q(stmts_, "SELECT 1 FROM volumes WHERE id = ?");
    q.bind(1, id);
    if (q.step() != SQLITE_ROW)
      return Status::error(ErrorKind::kNotFound, str_cat("no volume ", id));
    return Status::error(ErrorKind::kConflict,
                         str_cat("volume ", id, ": policy changed meanwhile"));
  }

  Result<std::vector<VolumeRecord>> list_volumes() override {
    std::lock_guard<std::mutex> lock(mu_);
    Stmt s(stmts_,
           "SELECT id, state, policy, sealed_secret, description, created_at, updated_at "
           "FROM volumes ORDER BY created_at, id");
    if (!s.ok()) return db_error("prepare volume list");
    std::vector<VolumeRecord> out;
    int rc;
    while ((rc = s.step()) == SQLITE_ROW) {
      auto r = read_volume(s);
      if (!r.is_ok()) return r.status();
      out.push_back(std::move(r).value());
    }
    if (rc != SQLITE_DONE) return db_error("list volumes");
    return out;
  }

  Result<std::vector<std::string>> expire_pending(int64_t created_before, int64_t now,
                                                  const AuditEvent& event) override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> ids;
    Status status = in_transaction("expiry", [&]() -> Status {
      Stmt s(stmts_,
             "UPDATE volumes SET state = 'revoked', updated_at = ? "
             "WHERE state = 'pending' AND created_at < ? RETURNING id");
      if (!s.ok()) return db_error("prepare expiry");
      s.bind(1, now);
      s.bind(2, created_before);
      int rc;
      while ((rc = s.step()) == SQLITE_ROW) ids.push_back(s.text(0));
      if (rc != SQLITE_DONE) return db_error("expire pending volumes");
      for (const std::string& id : ids) {
        AuditEvent e = event;
        e.volume_id = id;
        KEYGATE_RETURN_IF_ERROR(insert_audit_locked(e));
      }
      return Status::ok();
    });
    if (!status.is_ok()) return status;
    return ids;
  }

  Status insert_approval(const ApprovalRecord& r, const AuditEvent& event) override {
    std::lock_guard<std::mutex> lock(mu_);
    return in_transaction("approval request", [&]() -> Status {
      Stmt s(
          stmts_,
          "INSERT INTO approvals(id, volume_id, instance, state, record, created_at, expires_at) "
          "VALUES(?, ?, ?, ?, ?, ?, ?)");
      if (!s.ok()) return db_error("prepare approval insert");
      s.bind(1, r.id);
      s.bind(2, r.volume_id);
      s.bind(3, r.instance);
      s.bind(4, r.state);
      s.bind(5, r.record);
      s.bind(6, r.created_at);
      s.bind(7, r.expires_at);
      if (s.step() != SQLITE_DONE) return db_error("insert approval");
      return insert_audit_locked(event);
    });
  }

  Result<ApprovalRecord> get_approval(const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    Stmt s(stmts_,
           "SELECT id, volume_id, instance, state, record, created_at, expires_at FROM approvals "
           "WHERE id = ?");
    if (!s.ok()) return db_error("prepare approval select");
    s.bind(1, id);
    const int rc = s.step();
    if (rc == SQLITE_DONE)
      return Status::error(ErrorKind::kNotFound, str_cat("no approval request ", id));
    if (rc != SQLITE_ROW) return db_error("select approval");
    return read_approval(s);
  }

  Result<std::optional<ApprovalRecord>> find_pending_approval(
      const std::string& volume_id, const std::string& instance) override {
    std::lock_guard<std::mutex> lock(mu_);
    Stmt s(stmts_,
           "SELECT id, volume_id, instance, state, record, created_at, expires_at FROM approvals "
           "WHERE volume_id = ? AND instance = ? AND state = 'pending' "
           "ORDER BY created_at DESC, id LIMIT 1");
    if (!s.ok()) return db_error("prepare approval lookup");
    s.bind(1, volume_id);
    s.bind(2, instance);
    const int rc = s.step();
    if (rc == SQLITE_DONE) return std::optional<ApprovalRecord>();
    if (rc != SQLITE_ROW) return db_error("look up approval");
    return std::optional<ApprovalRecord>(read_approval(s));
  }

  Result<std::vector<ApprovalRecord>> list_approvals(bool pending_only, int limit) override {
    std::lock_guard<std::mutex> lock(mu_);
    Stmt s(stmts_,
           "SELECT id, volume_id, instance, state, record, created_at, expires_at FROM approvals "
           "WHERE state = 'pending' OR ? = 0 ORDER BY created_at DESC, id LIMIT ?");
    if (!s.ok()) return db_error("prepare approval list");
    s.bind(1, static_cast<int64_t>(pending_only ? 1 : 0));
    s.bind(2, static_cast<int64_t>(limit));
    std::vector<ApprovalRecord> out;
    int rc;
    while ((rc = s.step()) == SQLITE_ROW) out.push_back(read_approval(s));
    if (rc != SQLITE_DONE) return db_error("list approvals");
    return out;
  }

  Status record_counted_release(const CountedRelease& count, const AuditEvent& event) override {
    std::lock_guard<std::mutex> lock(mu_);
    return in_transaction("counted release", [&]() -> Status {
      KEYGATE_RETURN_IF_ERROR(count_release_locked(count));
      return insert_audit_locked(event);
    });
  }

  Status update_approval(const ApprovalRecord& expected, const ApprovalRecord& updated,
                         const AuditEvent& event, const CountedRelease* count) override {
    std::lock_guard<std::mutex> lock(mu_);
    return in_transaction("approval change", [&]() -> Status {
      if (count != nullptr) KEYGATE_RETURN_IF_ERROR(count_release_locked(*count));
      Stmt s(
          stmts_,
          "UPDATE approvals SET state = ?, record = ? WHERE id = ? AND state = ? AND record = ?");
      if (!s.ok()) return db_error("prepare approval update");
      s.bind(1, updated.state);
      s.bind(2, updated.record);
      s.bind(3, expected.id);
      s.bind(4, expected.state);
      s.bind(5, expected.record);
      if (s.step() != SQLITE_DONE) return db_error("update approval");
      if (sqlite3_changes(db_) != 1) {
        Stmt q(stmts_, "SELECT 1 FROM approvals WHERE id = ?");
        q.bind(1, expected.id);
        if (q.step() != SQLITE_ROW) {
          return Status::error(ErrorKind::kNotFound, str_cat("no approval request ", expected.id));
        }
        return Status::error(ErrorKind::kConflict,
                             str_cat("approval request ", expected.id, " changed meanwhile"));
      }
      return insert_audit_locked(event);
    });
  }

  Status insert_admin_cert(const AdminCertRecord& r, const AuditEvent& event) override {
    std::lock_guard<std::mutex> lock(mu_);
    return in_transaction("admin certificate", [&]() -> Status {
      Stmt s(stmts_,
             "INSERT INTO admin_certs(serial, name, role, issued_by, issued_at, expires_at, "
             "revoked_at) "
             "VALUES(?, ?, ?, ?, ?, ?, ?)");
      if (!s.ok()) return db_error("prepare admin certificate insert");
      s.bind(1, r.serial);
      s.bind(2, r.name);
      s.bind(3, r.role);
      s.bind(4, r.issued_by);
      s.bind(5, r.issued_at);
      s.bind(6, r.expires_at);
      s.bind(7, r.revoked_at);
      if (s.step() != SQLITE_DONE) return db_error("insert admin certificate");
      return insert_audit_locked(event);
    });
  }

  Result<AdminCertRecord> get_admin_cert(const std::string& serial) override {
    std::lock_guard<std::mutex> lock(mu_);
    Stmt s(
        stmts_,
        "SELECT serial, name, role, issued_by, issued_at, expires_at, revoked_at FROM admin_certs "
        "WHERE serial = ?");
    if (!s.ok()) return db_error("prepare admin certificate select");
    s.bind(1, serial);
    const int rc = s.step();
    if (rc == SQLITE_DONE) {
      return Status::error(ErrorKind::kNotFound, str_cat("no admin certificate ", serial));
    }
    if (rc != SQLITE_ROW) return db_error("select admin certificate");
    return read_admin_cert(s);
  }

  Result<std::vector<AdminCertRecord>> list_admin_certs() override {
    std::lock_guard<std::mutex> lock(mu_);
    Stmt s(
        stmts_,
        "SELECT serial, name, role, issued_by, issued_at, expires_at, revoked_at FROM admin_certs "
        "ORDER BY issued_at, serial");
    if (!s.ok()) return db_error("prepare admin certificate list");
    std::vector<AdminCertRecord> out;
    int rc;
    while ((rc = s.step()) == SQLITE_ROW) out.push_back(read_admin_cert(s));
    if (rc != SQLITE_DONE) return db_error("list admin certificates");
    return out;
  }

  Status revoke_admin_cert(const std::string& serial, int64_t now,
                           const AuditEvent& event) override {
    std::lock_guard<std::mutex> lock(mu_);
    return in_transaction("admin certificate revocation", [&]() -> Status {
      Stmt s(stmts_, "UPDATE admin_certs SET revoked_at = ? WHERE serial = ? AND revoked_at = 0");
      if (!s.ok()) return db_error("prepare admin certificate revocation");
      s.bind(1, now);
      s.bind(2, serial);
      if (s.step() != SQLITE_DONE) return db_error("revoke admin certificate");
      if (sqlite3_changes(db_) != 1) {
        Stmt q(stmts_, "SELECT 1 FROM admin_certs WHERE serial = ?");
        q.bind(1, serial);
        if (q.step() != SQLITE_ROW) {
          return Status::error(ErrorKind::kNotFound, str_cat("no admin certificate ", serial));
        }
        return Status::error(ErrorKind::kConflict,
                             str_cat("admin certificate ", serial, " is already revoked"));
      }
      return insert_audit_locked(event);
    });
  }

  // Concurrent appends share one transaction and one fsync (GroupCommit).
  Status append_audit(const AuditEvent& e) override { return audit_group_.append(e); }

  Result<std::vector<AuditEvent>> recent_audit(int limit) override {
    std::lock_guard<std::mutex> lock(mu_);
    Stmt s(stmts_,
           "SELECT time, event, outcome, volume_id, peer, detail FROM "
           "(SELECT * FROM audit ORDER BY seq DESC LIMIT ?) ORDER BY seq");
    if (!s.ok()) return db_error("prepare audit select");
    s.bind(1, static_cast<int64_t>(limit));
    std::vector<AuditEvent> out;
    int rc;
    while ((rc = s.step()) == SQLITE_ROW) {
      out.push_back(
          AuditEvent{s.integer(0), s.text(1), s.text(2), s.text(3), s.text(4), s.text(5)});
    }
    if (rc != SQLITE_DONE) return db_error("select audit");
    return out;
  }

  Result<std::vector<AuditRecord>> read_audit(int64_t after_seq, int limit) override {
    std::lock_guard<std::mutex> lock(mu_);
    Stmt s(stmts_,
           "SELECT seq, time, event, outcome, volume_id, peer, detail, prev_hash, hash FROM audit "
           "WHERE seq > ? ORDER BY seq LIMIT ?");
    if (!s.ok()) return db_error("prepare audit read");
    s.bind(1, after_seq);
    s.bind(2, static_cast<int64_t>(limit));
    std::vector<AuditRecord> out;
    int rc;
    while ((rc = s.step()) == SQLITE_ROW) {
      out.push_back(AuditRecord{
          s.integer(0),
          AuditEvent{s.integer(1), s.text(2), s.text(3), s.text(4), s.text(5), s.text(6)},
          s.blob(7), s.blob(8)});
    }
    if (rc != SQLITE_DONE) return db_error("read audit");
    return out;
  }

  // Chains a trail that predates the hash chain (its table has no hash
  // column): each record as found, in order, then one record saying so. All
  // in one transaction with adding the columns: a crash leaves the old
  // trail, and the next start does it again.
  Status chain_unchained_trail() {
    std::lock_guard<std::mutex> lock(mu_);
    return in_transaction("chaining the audit trail", [&]() -> Status {
      sqlite3_stmt* probe = nullptr;
      const bool chained = sqlite3_prepare_v2(db_, "SELECT hash FROM audit LIMIT 0", -1, &probe,
                                              nullptr) == SQLITE_OK;
      sqlite3_finalize(probe);
      if (chained) return Status::ok();
      if (sqlite3_exec(db_, kAddChainColumns, nullptr, nullptr, nullptr) != SQLITE_OK) {
        return db_error("add the audit chain's columns");
      }
      std::vector<AuditRecord> found;
      {
        Stmt s(stmts_,
               "SELECT seq, time, event, outcome, volume_id, peer, detail FROM audit ORDER BY seq");
        if (!s.ok()) return db_error("prepare unchained audit read");
        int rc;
        while ((rc = s.step()) == SQLITE_ROW) {
          found.push_back(AuditRecord{
              s.integer(0),
              AuditEvent{s.integer(1), s.text(2), s.text(3), s.text(4), s.text(5), s.text(6)},
              {},
              {}});
        }
        if (rc != SQLITE_DONE) return db_error("read unchained audit");
      }
      const AuditRecord* head = nullptr;
      for (AuditRecord& r : found) {
        r = chain_audit_record(head, r.seq, std::move(r.event));
        Stmt u(stmts_,
               "UPDATE audit SET event = ?, outcome = ?, volume_id = ?, peer = ?, detail = ?, "
               "prev_hash = ?, hash = ? WHERE seq = ?");
        if (!u.ok()) return db_error("prepare audit chaining");
        bind_chained_fields(u, 1, r);
        u.bind(8, r.seq);
        if (u.step() != SQLITE_DONE) return db_error("chain audit record");
        head = &r;
      }
      return insert_audit_locked(
          AuditEvent{static_cast<int64_t>(::time(nullptr)), "audit.chain", "ok", "", "local",
                     str_cat("hash chain begun; the ", found.size(),
                             " records before this one are chained as found")});
    });
  }

 private:
  Status db_error(const char* what) {
    return Status::error(ErrorKind::kIo, str_cat("store: ", what, ": ", sqlite3_errmsg(db_)));
  }

  // Runs `body` in one write transaction (BEGIN IMMEDIATE: the write lock
  // is taken first, so no other writer, in this process or another, comes
  // between) and commits it, or rolls all of it back if `body` or the
  // commit fails. mu_ held.
  Status in_transaction(const char* what, const std::function<Status()>& body) {
    if (sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) != SQLITE_OK) {
      return db_error(str_cat("begin ", what).c_str());
    }
    Status status = body();
    if (status.is_ok() && sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr) != SQLITE_OK) {
      status = db_error(str_cat("commit ", what).c_str());
    }
    if (!status.is_ok()) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    return status;
  }

  // Forgets `count`'s instance's releases before its period, counts the
  // rest, and records this one if there are fewer than its max. mu_ held,
  // inside the caller's transaction.
  Status count_release_locked(const CountedRelease& count) {
    Stmt forget(stmts_, "DELETE FROM releases WHERE volume_id = ? AND instance = ? AND time < ?");
    if (!forget.ok()) return db_error("prepare release pruning");
    forget.bind(1, count.volume_id);
    forget.bind(2, count.instance);
    forget.bind(3, count.since);
    if (forget.step() != SQLITE_DONE) return db_error("prune releases");
    Stmt n(stmts_, "SELECT count(*) FROM releases WHERE volume_id = ? AND instance = ?");
    if (!n.ok()) return db_error("prepare release count");
    n.bind(1, count.volume_id);
    n.bind(2, count.instance);
    if (n.step() != SQLITE_ROW) return db_error("count releases");
    const int64_t released = n.integer(0);
    if (released >= count.max) {
      return Status::error(ErrorKind::kRefused,
                           str_cat(released, " releases to instance ", count.instance,
                                   " within the period already (at most ", count.max, ")"));
    }
    Stmt add(stmts_, "INSERT INTO releases(volume_id, instance, time) VALUES(?, ?, ?)");
    if (!add.ok()) return db_error("prepare release insert");
    add.bind(1, count.volume_id);
    add.bind(2, count.instance);
    add.bind(3, count.now);
    if (add.step() != SQLITE_DONE) return db_error("insert release");
    return Status::ok();
  }

  Status commit_audit_group(const std::vector<AuditEvent>& events) {
    std::lock_guard<std::mutex> lock(mu_);
    return in_transaction("audit group", [&]() -> Status {
      for (const AuditEvent& e : events) KEYGATE_RETURN_IF_ERROR(insert_audit_locked(e));
      return Status::ok();
    });
  }

  // A record's text fields and hashes, as statement parameters `at` to
  // `at` + 6: event, outcome, volume_id, peer, detail, prev_hash, hash.
  static void bind_chained_fields(Stmt& s, int at, const AuditRecord& r) {
    s.bind(at, r.event.event);
    s.bind(at + 1, r.event.outcome);
    s.bind(at + 2, r.event.volume_id);
    s.bind(at + 3, r.event.peer);
    s.bind(at + 4, r.event.detail);
    s.bind(at + 5, r.prev_hash);
    s.bind(at + 6, r.hash);
  }

  // One audit row chained onto the trail's head, inside the caller's
  // transaction (mu_ held; BEGIN IMMEDIATE, so no other writer, in this
  // process or another, moves the head meanwhile). Its number is one past
  // the highest ever given (sqlite_sequence): records cut from the end show
  // as a gap once the next is written.
  Status insert_audit_locked(const AuditEvent& e) {
    AuditRecord head;
    bool have_head = false;
    {
      Stmt h(stmts_, "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1");
      if (!h.ok()) return db_error("prepare audit head");
      int rc = h.step();
      if (rc == SQLITE_ROW) {
        head.seq = h.integer(0);
        head.hash = h.blob(1);
        have_head = true;
      } else if (rc != SQLITE_DONE) {
        return db_error("read audit head");
      }
    }
    int64_t last = head.seq;
    {
      Stmt q(stmts_, "SELECT seq FROM sqlite_sequence WHERE name = 'audit'");
      if (!q.ok()) return db_error("prepare audit sequence");
      int rc = q.step();
      if (rc == SQLITE_ROW) {
        last = std::max(last, q.integer(0));
      } else if (rc != SQLITE_DONE) {
        return db_error("read audit sequence");
      }
    }
    const AuditRecord r = chain_audit_record(have_head ? &head : nullptr, last + 1, e);
    Stmt s(stmts_,
           "INSERT INTO audit(seq, time, event, outcome, volume_id, peer, detail, prev_hash, hash) "
           "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)");
    if (!s.ok()) return db_error("prepare audit insert");
    s.bind(1, r.seq);
    s.bind(2, r.event.time);
    bind_chained_fields(s, 3, r);
    if (s.step() != SQLITE_DONE) return db_error("insert audit");
    return Status::ok();
  }

  sqlite3* db_;
  StmtCache stmts_;
  std::mutex mu_;
  GroupCommit audit_group_{
      [this](const std::vector<AuditEvent>& events) { return commit_audit_group(events); }};
  NonceTable nonces_;
};

// The schema's version, in the file's user_version: 0 is a store from
// before versioning (its tables are made as version 1 makes them, IF NOT
// EXISTS). Checked, upgraded and recorded in one write transaction; a store
// of a newer version is refused. (Chaining a trail from before the hash
// chain is a step of its own after it: see chain_unchained_trail.)
constexpr int64_t kSqliteSchemaVersion = 1;

Status migrate_sqlite_schema(sqlite3* db) {
  auto error = [&](const char* what) {
    return Status::error(ErrorKind::kIo, str_cat(what, ": ", sqlite3_errmsg(db)));
  };
  if (sqlite3_exec(db, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) != SQLITE_OK)
    return error("begin migration");
  Status status = [&]() -> Status {
    sqlite3_stmt* v = nullptr;
    if (sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &v, nullptr) != SQLITE_OK ||
        sqlite3_step(v) != SQLITE_ROW) {
      sqlite3_finalize(v);
      return error("read the schema version");
    }
    const int64_t version = sqlite3_column_int64(v, 0);
    sqlite3_finalize(v);
    if (version > kSqliteSchemaVersion) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("the store's schema is version ", version,
                                   ", newer than this keygate-server knows (", kSqliteSchemaVersion,
                                   "): run a keygate-server at least as new as the one that "
                                   "upgraded it"));
    }
    if (version == kSqliteSchemaVersion) return Status::ok();
    if (sqlite3_exec(db, kSchema, nullptr, nullptr, nullptr) != SQLITE_OK)
      return error("make the schema");
    const std::string set = str_cat("PRAGMA user_version = ", kSqliteSchemaVersion);
    if (sqlite3_exec(db, set.c_str(), nullptr, nullptr, nullptr) != SQLITE_OK)
      return error("record the schema version");
    return Status::ok();
  }();
  if (status.is_ok() && sqlite3_exec(db, "COMMIT", nullptr, nullptr, nullptr) != SQLITE_OK) {
    status = error("commit migration");
  }
  if (!status.is_ok()) sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
  return status;
}

}  // namespace

Result<StoreDump> dump_sqlite_store(const std::string& path) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return Status::error(ErrorKind::kIo, str_cat("open store ", path, ": ", msg));
  }
  std::unique_ptr<sqlite3, int (*)(sqlite3*)> closer(db, &sqlite3_close);
  StoreDump d;
  StmtCache stmts(db);
  auto failed = [&](const char* what) {
    return Status::error(ErrorKind::kIo,
                         str_cat("read store ", path, ": ", what, ": ", sqlite3_errmsg(db)));
  };
  // Each query's rows through `row`; every step checked.
  auto each = [&](const char* sql, const std::function<Status(Stmt&)>& row) -> Status {
    Stmt s(stmts, sql);
    if (!s.ok()) return failed(sql);
    int rc;
    while ((rc = s.step()) == SQLITE_ROW) KEYGATE_RETURN_IF_ERROR(row(s));
    return rc == SQLITE_DONE ? Status::ok() : failed(sql);
  };
  Status st = [&]() -> Status {
    if (sqlite3_exec(db, "BEGIN", nullptr, nullptr, nullptr) != SQLITE_OK) return failed("begin");
    KEYGATE_RETURN_IF_ERROR(
        each("SELECT id, state, policy, sealed_secret, description, created_at, updated_at FROM "
             "volumes ORDER BY id",
             [&](Stmt& s) -> Status {
               auto v = read_volume(s);
               if (!v.is_ok()) return v.status();
               d.volumes.push_back(std::move(v).value());
               return Status::ok();
             }));
    KEYGATE_RETURN_IF_ERROR(each(
        "SELECT token_hash, template, expires_at, uses_left FROM enrollment_tokens", [&](Stmt& s) {
          d.tokens.push_back(StoreDump::Token{s.blob(0), s.text(1), s.integer(2), s.integer(3)});
          return Status::ok();
        }));
    KEYGATE_RETURN_IF_ERROR(
        each("SELECT id, volume_id, instance, state, record, created_at, expires_at FROM approvals "
             "ORDER BY id",
             [&](Stmt& s) {
               d.approvals.push_back(read_approval(s));
               return Status::ok();
             }));
    KEYGATE_RETURN_IF_ERROR(each("SELECT volume_id, instance, time FROM releases", [&](Stmt& s) {
      d.releases.push_back(StoreDump::Release{s.text(0), s.text(1), s.integer(2)});
      return Status::ok();
    }));
    KEYGATE_RETURN_IF_ERROR(
        each("SELECT serial, name, role, issued_by, issued_at, expires_at, revoked_at FROM "
             "admin_certs ORDER BY serial",
             [&](Stmt& s) {
               d.admin_certs.push_back(read_admin_cert(s));
               return Status::ok();
             }));
    KEYGATE_RETURN_IF_ERROR(
        each("SELECT seq, time, event, outcome, volume_id, peer, detail, prev_hash, hash FROM "
             "audit ORDER BY seq",
             [&](Stmt& s) {
               d.audit.push_back(AuditRecord{
                   s.integer(0),
                   AuditEvent{s.integer(1), s.text(2), s.text(3), s.text(4), s.text(5), s.text(6)},
                   s.blob(7), s.blob(8)});
               return Status::ok();
             }));
    d.audit_last_seq = d.audit.empty() ? 0 : d.audit.back().seq;
    return each("SELECT seq FROM sqlite_sequence WHERE name = 'audit'", [&](Stmt& s) {
      d.audit_last_seq = std::max(d.audit_last_seq, s.integer(0));
      return Status::ok();
    });
  }();
  sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
  stmts.clear();
  if (!st.is_ok()) return st;
  return d;
}

Result<std::unique_ptr<Store>> open_sqlite_store(const std::string& path) {
  mode_t old = umask(077);
  sqlite3* db = nullptr;
  int rc =
      sqlite3_open_v2(path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
  umask(old);
  if (rc != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return Status::error(ErrorKind::kIo, str_cat("open store ", path, ": ", msg));
  }
  sqlite3_busy_timeout(db, 5000);
  char* err = nullptr;
  const char* pragmas = "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;";
  if (sqlite3_exec(db, pragmas, nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : sqlite3_errmsg(db);
    sqlite3_free(err);
    sqlite3_close(db);
    return Status::error(ErrorKind::kIo, str_cat("initialise store ", path, ": ", msg));
  }
  Status schema = migrate_sqlite_schema(db);
  if (!schema.is_ok()) {
    sqlite3_close(db);
    return schema.with_context(str_cat("initialise store ", path));
  }
  chmod(path.c_str(), 0600);
  auto store = std::make_unique<SqliteStore>(db);
  Status chained = store->chain_unchained_trail();
  if (!chained.is_ok()) return chained.with_context(str_cat("initialise store ", path));
  return std::unique_ptr<Store>(std::move(store));
}

}  // namespace keygate::server
