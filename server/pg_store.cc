// The PostgreSQL store: the same contract as the SQLite one (server/store.h),
// for several keygate-server replicas on one database. Everything the
// replicas share lives in the database, nothing in a replica's memory:
// challenge nonces (an unlogged table: consumed once by whichever replica
// sees the answer), tokens, volumes, approvals, counted releases and the
// audit chain, whose order is the database's (one row, audit_head, is
// locked by every append until its transaction ends).
#include <endian.h>
#include <libpq-fe.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/encoding.h"
#include "server/audit_chain.h"
#include "server/group_commit.h"
#include "server/store.h"

namespace keygate::server {
namespace {

constexpr Oid kInt8Oid = 20;
constexpr Oid kTextOid = 25;
constexpr Oid kByteaOid = 17;
constexpr Oid kFloat8Oid = 701;

// The schema, one entry per version: migration N takes a database from
// version N-1 to N. A released entry is never edited; a change is a new one.
const char* const kMigrations[] = {
    // 1: the tables of the SQLite store, the audit chain's head and the
    // nonces. The trail's text is kept as bytes, exactly as it was hashed
    // (a detail may quote what a client sent, UTF-8 or not) (unlogged: short-lived, not worth a WAL
    // write or a standby's
    // copy; after a crash the clients ask for new ones).
    R"sql(
CREATE TABLE volumes (
  id TEXT PRIMARY KEY,
  state TEXT NOT NULL CHECK (state IN ('pending', 'active', 'revoked')),
  policy TEXT NOT NULL,
  sealed_secret BYTEA NOT NULL,
  description TEXT NOT NULL DEFAULT '',
  created_at BIGINT NOT NULL,
  updated_at BIGINT NOT NULL
);
CREATE TABLE enrollment_tokens (
  token_hash BYTEA PRIMARY KEY,
  template TEXT NOT NULL,
  expires_at BIGINT NOT NULL,
  uses_left BIGINT NOT NULL
);
CREATE TABLE audit (
  seq BIGINT PRIMARY KEY,
  time BIGINT NOT NULL,
  event BYTEA NOT NULL,
  outcome BYTEA NOT NULL,
  volume_id BYTEA NOT NULL,
  peer BYTEA NOT NULL,
  detail BYTEA NOT NULL,
  prev_hash BYTEA NOT NULL,
  hash BYTEA NOT NULL
);
CREATE TABLE audit_head (
  one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
  seq BIGINT NOT NULL
);
INSERT INTO audit_head(seq) VALUES (0);
CREATE TABLE approvals (
  id TEXT PRIMARY KEY,
  volume_id TEXT NOT NULL,
  instance TEXT NOT NULL,
  state TEXT NOT NULL,
  record TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL
);
CREATE INDEX approvals_by_instance ON approvals(volume_id, instance, state);
CREATE TABLE releases (
  volume_id TEXT NOT NULL,
  instance TEXT NOT NULL,
  time BIGINT NOT NULL
);
CREATE INDEX releases_by_instance ON releases(volume_id, instance, time);
CREATE TABLE admin_certs (
  serial TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  role TEXT NOT NULL,
  issued_by TEXT NOT NULL,
  issued_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL,
  revoked_at BIGINT NOT NULL DEFAULT 0
);
CREATE UNLOGGED TABLE nonces (
  nonce BYTEA PRIMARY KEY,
  expires_at BIGINT NOT NULL
);
CREATE INDEX nonces_by_expiry ON nonces(expires_at);
CREATE UNLOGGED TABLE rate_buckets (
  key TEXT PRIMARY KEY,
  tokens DOUBLE PRECISION NOT NULL,
  at_ms BIGINT NOT NULL,
  refused BIGINT NOT NULL,
  full_at_ms BIGINT NOT NULL
);
CREATE INDEX rate_buckets_by_full ON rate_buckets(full_at_ms);
CREATE TABLE policy_versions (
  version BIGSERIAL PRIMARY KEY,
  sha256 TEXT NOT NULL,
  text TEXT NOT NULL,
  loaded_by TEXT NOT NULL,
  loaded_at BIGINT NOT NULL
);
)sql",
};
constexpr int64_t kSchemaVersion = sizeof(kMigrations) / sizeof(kMigrations[0]);

// Held (for its transaction) by whichever replica migrates: 'keygate' in ASCII.
constexpr int64_t kMigrationLock = 0x6b657967617465;

// Statement parameters, all sent in binary: no quoting or escaping anywhere.
// Text as PostgreSQL keeps it: UTF-8 without NUL (a database in UTF-8
// refuses anything else). Bytes that are not well-formed UTF-8, and NUL,
// become U+FFFD, so a client's garbage cannot make its request's record
// unwritable.
std::string pg_text(std::string_view s) {
  std::string out = to_utf8_lossy(s);
  if (out.find('\0') == std::string::npos) return out;
  std::string clean;
  for (char c : out) {
    if (c == '\0') {
      clean += "\xEF\xBF\xBD";
    } else {
      clean += c;
    }
  }
  return clean;
}

class Params {
 public:
  Params& text(const std::string& s) { return add(pg_text(s), kTextOid); }
  // Text kept exactly, as bytes (the audit trail's columns).
  Params& raw(const std::string& s) { return add(s, kByteaOid); }
  Params& bytes(const Bytes& b) { return add(std::string(b.begin(), b.end()), kByteaOid); }
  Params& int8(int64_t v) {
    const uint64_t be = htobe64(static_cast<uint64_t>(v));
    return add(std::string(reinterpret_cast<const char*>(&be), sizeof(be)), kInt8Oid);
  }
  Params& float8(double v) {
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(bits));
    const uint64_t be = htobe64(bits);
    return add(std::string(reinterpret_cast<const char*>(&be), sizeof(be)), kFloat8Oid);
  }
  int size() const { return static_cast<int>(data_.size()); }
  const Oid* types() const { return types_.data(); }
  const char* const* values() const { return values_.data(); }
  const int* lengths() const { return lengths_.data(); }
  const int* formats() const { return formats_.data(); }

 private:
  Params& add(std::string v, Oid type) {
    data_.push_back(std::move(v));  // a deque: earlier pointers stay valid
    types_.push_back(type);
    values_.push_back(data_.back().data());
    lengths_.push_back(static_cast<int>(data_.back().size()));
    formats_.push_back(1);
    return *this;
  }
  std::deque<std::string> data_;
  std::vector<Oid> types_;
  std::vector<const char*> values_;
  std::vector<int> lengths_;
  std::vector<int> formats_;
};

// A statement's result, in binary: text as its bytes, BIGINT as 8 bytes.
class Rows {
 public:
  explicit Rows(PGresult* r) : r_(r, &PQclear) {}
  const PGresult* get() const { return r_.get(); }
  int count() const { return PQntuples(r_.get()); }
  int64_t affected() const {
    const char* n = PQcmdTuples(r_.get());
    return n[0] == '\0' ? 0 : std::strtoll(n, nullptr, 10);
  }
  std::string text(int row, int col) const {
    return std::string(PQgetvalue(r_.get(), row, col),
                       static_cast<size_t>(PQgetlength(r_.get(), row, col)));
  }
  Bytes bytes(int row, int col) const {
    const auto* p = reinterpret_cast<const uint8_t*>(PQgetvalue(r_.get(), row, col));
    return Bytes(p, p + PQgetlength(r_.get(), row, col));
  }
  double float8(int row, int col) const {
    const int64_t bits = int8(row, col);
    double v = 0;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }
  int64_t int8(int row, int col) const {
    uint64_t be = 0;
    if (PQgetlength(r_.get(), row, col) != sizeof(be)) return 0;
    std::memcpy(&be, PQgetvalue(r_.get(), row, col), sizeof(be));
    return static_cast<int64_t>(be64toh(be));
  }

 private:
  std::unique_ptr<PGresult, void (*)(PGresult*)> r_;
};

// libpq's message on one line, whatever it quotes (a host name, a value
// from the database) escaped for a log or a terminal.
std::string pg_message(const char* m) {
  std::string s = m != nullptr ? m : "";
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  for (char& c : s) {
    if (c == '\n' || c == '\t') c = ' ';
  }
  return printable(s, 1024);
}

// One database connection and the statements prepared on it (by the SQL
// text's address: the statements are string literals).
struct Conn {
  PGconn* pg = nullptr;
  std::unordered_map<const char*, std::string> prepared;
  ~Conn() { PQfinish(pg); }

  bool broken() const { return PQstatus(pg) != CONNECTION_OK; }

  Status error(const char* what, const PGresult* r) const {
    const std::string msg = pg_message(r != nullptr ? PQresultErrorMessage(r) : PQerrorMessage(pg));
    const char* state = r != nullptr ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : nullptr;
    const std::string code = state != nullptr ? state : "";
    // A lost connection, a database shutting down or not accepting
    // connections, a serialisation failure, a deadlock, a statement that
    // waited past its timeout (a lock held by a stuck session): retry later.
    if (broken() || code == "40001" || code == "40P01" || code.rfind("08", 0) == 0 ||
        code.rfind("57P", 0) == 0 || code == "53300" || code == "57014" || code == "55P03") {
      return Status::error(ErrorKind::kUnavailable,
                           str_cat("store: ", what, ": database unavailable: ", msg));
    }
    return Status::error(ErrorKind::kIo, str_cat("store: ", what, ": ", msg));
  }

  // Runs `sql` (a string literal, prepared once per connection) with `p`.
  Result<Rows> exec(const char* what, const char* sql, const Params& p) {
    auto it = prepared.find(sql);
    if (it == prepared.end()) {
      std::string name = str_cat("k", prepared.size());
      Rows prep(PQprepare(pg, name.c_str(), sql, p.size(), p.types()));
      if (PQresultStatus(prep.get()) != PGRES_COMMAND_OK) return error(what, prep.get());
      it = prepared.emplace(sql, std::move(name)).first;
    }
    PGresult* r =
        PQexecPrepared(pg, it->second.c_str(), p.size(), p.values(), p.lengths(), p.formats(), 1);
    Rows rows(r);
    const ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) return error(what, r);
    return rows;
  }
  Result<Rows> exec(const char* what, const char* sql) { return exec(what, sql, Params()); }

  // A statement made for one call (its text varies), not prepared.
  Result<Rows> exec_unprepared(const char* what, const std::string& sql, const Params& p) {
    PGresult* r =
        PQexecParams(pg, sql.c_str(), p.size(), p.types(), p.values(), p.lengths(), p.formats(), 1);
    Rows rows(r);
    const ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) return error(what, r);
    return rows;
  }

  // A command without parameters (BEGIN, COMMIT, the schema).
  Status command(const char* what, const char* sql) {
    Rows r(PQexec(pg, sql));
    const ExecStatusType st = PQresultStatus(r.get());
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) return error(what, r.get());
    return Status::ok();
  }
};

// A bounded pool of connections. A connection left broken or inside a
// transaction is closed, not reused; a new one is opened on demand. While
// the database cannot be reached every call fails at once with kUnavailable
// (the HTTP front answers 503 with Retry-After).
class Pool {
 public:
  Pool(std::string conninfo, int max) : conninfo_(std::move(conninfo)), max_(max) {}
  ~Pool() {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.clear();
  }

  class Lease {
   public:
    Lease(Pool* pool, std::unique_ptr<Conn> conn) : pool_(pool), conn_(std::move(conn)) {}
    Lease(Lease&&) = default;
    ~Lease() {
      if (conn_ != nullptr) pool_->give_back(std::move(conn_));
    }
    Conn& operator*() { return *conn_; }
    Conn* operator->() { return conn_.get(); }

   private:
    Pool* pool_;
    std::unique_ptr<Conn> conn_;
  };

  Result<Lease> acquire() {
    std::unique_lock<std::mutex> lock(mu_);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (idle_.empty() && open_ >= max_) {
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && idle_.empty() &&
          open_ >= max_) {
        return Status::error(ErrorKind::kUnavailable, "store: every database connection is busy");
      }
    }
    if (!idle_.empty()) {
      std::unique_ptr<Conn> c = std::move(idle_.back());
      idle_.pop_back();
      return Lease(this, std::move(c));
    }
    ++open_;
    lock.unlock();
    auto c = connect(conninfo_);
    if (!c.is_ok()) {
      lock.lock();
      --open_;
      cv_.notify_one();
      return c.status();
    }
    return Lease(this, std::move(c).value());
  }

  // One connection: keygate's defaults first, the operator's string over
  // them (a wait for a database that does not answer is bounded). keygate
  // never waits inside a transaction, so a session idle in one for 10 s is a
  // replica that stopped half way (a paused VM): PostgreSQL ends it, and
  // the locks it held (the trail's head: every replica's releases) go with
  // it. A wait for a lock gives up after 3 s, inside the unlocker's request
  // timeout: the answer is a 503 the unlocker retries, not a worker and a
  // database connection held while the client has gone.
  static Result<std::unique_ptr<Conn>> connect(const std::string& conninfo) {
    const char* keys[] = {"connect_timeout", "application_name", "options", "dbname", nullptr};
    const char* values[] = {"5", "keygate-server",
                            "-c statement_timeout=30000 -c lock_timeout=3000 "
                            "-c idle_in_transaction_session_timeout=10000",
                            conninfo.c_str(), nullptr};
    auto c = std::make_unique<Conn>();
    c->pg = PQconnectdbParams(keys, values, 1);
    if (c->pg == nullptr)
      return Status::error(ErrorKind::kUnavailable, "store: database connection: out of memory");
    if (PQstatus(c->pg) != CONNECTION_OK) {
      return Status::error(
          ErrorKind::kUnavailable,
          str_cat("store: cannot connect to the database: ", pg_message(PQerrorMessage(c->pg))));
    }
    // The server's notices ("already exists, skipping") are not errors and
    // not for the terminal.
    PQsetNoticeProcessor(
        c->pg, [](void*, const char*) {}, nullptr);
    return c;
  }

 private:
  void give_back(std::unique_ptr<Conn> c) {
    const bool reusable = !c->broken() && PQtransactionStatus(c->pg) == PQTRANS_IDLE;
    if (!reusable) c.reset();  // closed outside the lock
    std::lock_guard<std::mutex> lock(mu_);
    if (reusable) {
      idle_.push_back(std::move(c));
    } else {
      --open_;
    }
    cv_.notify_one();
  }

  const std::string conninfo_;
  const int max_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Conn>> idle_;
  int open_ = 0;
};

Result<VolumeRecord> read_volume(const Rows& r, int row) {
  VolumeRecord v;
  v.id = r.text(row, 0);
  auto state = parse_volume_state(r.text(row, 1));
  if (!state.is_ok()) return state.status();
  v.state = state.value();
  v.policy_json = r.text(row, 2);
  v.sealed_secret = r.bytes(row, 3);
  v.description = r.text(row, 4);
  v.created_at = r.int8(row, 5);
  v.updated_at = r.int8(row, 6);
  return v;
}

ApprovalRecord read_approval(const Rows& r, int row) {
  return ApprovalRecord{r.text(row, 0), r.text(row, 1), r.text(row, 2), r.text(row, 3),
                        r.text(row, 4), r.int8(row, 5), r.int8(row, 6)};
}

AdminCertRecord read_admin_cert(const Rows& r, int row) {
  return AdminCertRecord{r.text(row, 0), r.text(row, 1), r.text(row, 2), r.text(row, 3),
                         r.int8(row, 4), r.int8(row, 5), r.int8(row, 6)};
}

// Runs `body` in one transaction on `c` and commits it, or rolls all of it
// back if `body` or the commit fails. A commit whose answer is lost (the
// connection dropped) is reported as kUnavailable: the caller does not know
// whether it was written, and neither does its client, which retries.
Status in_transaction(Conn& c, const char* what, const std::function<Status()>& body) {
  KEYGATE_RETURN_IF_ERROR(c.command(what, "BEGIN"));
  Status status = body();
  if (status.is_ok()) status = c.command(what, "COMMIT");
  if (!status.is_ok() && !c.broken()) (void)c.command(what, "ROLLBACK");
  return status;
}

Status insert_audit_record(Conn& c, const AuditRecord& r);

// One audit record chained onto the trail's head, inside the caller's
// transaction. The head's row is locked until that transaction ends, so
// appends from every replica are chained one after another in the order
// the database commits them; its number is one past the highest ever given,
// so records cut from the end show as a gap once the next is written.
Status insert_audit(Conn& c, const std::vector<AuditEvent>& events) {
  if (events.empty()) return Status::ok();
  const auto n = static_cast<int64_t>(events.size());
  auto next = c.exec("advance the audit head", "UPDATE audit_head SET seq = seq + $1 RETURNING seq",
                     Params().int8(n));
  if (!next.is_ok()) return next.status();
  if (next->count() != 1) {
    return Status::error(ErrorKind::kIo, "store: the audit head's row is missing");
  }
  const int64_t first = next->int8(0, 0) - n + 1;
  auto last =
      c.exec("read the audit head", "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1");
  if (!last.is_ok()) return last.status();
  AuditRecord head;
  if (last->count() == 1) {
    head.seq = last->int8(0, 0);
    head.hash = last->bytes(0, 1);
  }
  std::vector<AuditRecord> records;
  records.reserve(events.size());
  const AuditRecord* prev = last->count() == 1 ? &head : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    records.push_back(chain_audit_record(prev, first + i, events[static_cast<size_t>(i)]));
    prev = &records.back();
  }
  if (records.size() == 1) return insert_audit_record(c, records.front());
  // A group in as few statements as the parameter limit allows: one round
  // trip for the group, not one per record.
  constexpr size_t kRowsPerStatement = 1000;
  for (size_t at = 0; at < records.size(); at += kRowsPerStatement) {
    std::string sql =
        "INSERT INTO audit(seq, time, event, outcome, volume_id, peer, detail, prev_hash, hash) "
        "VALUES";
    Params p;
    const size_t end = std::min(records.size(), at + kRowsPerStatement);
    for (size_t i = at; i < end; ++i) {
      const AuditRecord& r = records[i];
      const size_t base = (i - at) * 9;
      sql += str_cat(i == at ? "" : ",", "($", base + 1, ",$", base + 2, ",$", base + 3, ",$",
                     base + 4, ",$", base + 5, ",$", base + 6, ",$", base + 7, ",$", base + 8, ",$",
                     base + 9, ")");
      p.int8(r.seq)
          .int8(r.event.time)
          .raw(r.event.event)
          .raw(r.event.outcome)
          .raw(r.event.volume_id)
          .raw(r.event.peer)
          .raw(r.event.detail)
          .bytes(r.prev_hash)
          .bytes(r.hash);
    }
    KEYGATE_RETURN_IF_ERROR(c.exec_unprepared("insert audit group", sql, p).status());
  }
  return Status::ok();
}

Status insert_audit(Conn& c, const AuditEvent& e) {
  return insert_audit(c, std::vector<AuditEvent>{e});
}

// One record as it is, hashes and all.
Status insert_audit_record(Conn& c, const AuditRecord& r) {
  return c
      .exec(
          "insert audit",
          "INSERT INTO audit(seq, time, event, outcome, volume_id, peer, detail, prev_hash, hash) "
          "VALUES($1, $2, $3, $4, $5, $6, $7, $8, $9)",
          Params()
              .int8(r.seq)
              .int8(r.event.time)
              .raw(r.event.event)
              .raw(r.event.outcome)
              .raw(r.event.volume_id)
              .raw(r.event.peer)
              .raw(r.event.detail)
              .bytes(r.prev_hash)
              .bytes(r.hash))
      .status();
}

Status transition(Conn& c, const std::string& id, VolumeState from, VolumeState to, int64_t now) {
  auto u =
      c.exec("update volume state",
             "UPDATE volumes SET state = $1, updated_at = $2 WHERE id = $3 AND state = $4",
             Params().text(volume_state_name(to)).int8(now).text(id).text(volume_state_name(from)));
  if (!u.is_ok()) return u.status();
  if (u->affected() == 1) return Status::ok();
  auto q =
      c.exec("select volume state", "SELECT state FROM volumes WHERE id = $1", Params().text(id));
  if (!q.is_ok()) return q.status();
  if (q->count() == 0) return Status::error(ErrorKind::kNotFound, str_cat("no volume ", id));
  return Status::error(ErrorKind::kConflict, str_cat("volume ", id, " is ", q->text(0, 0), ", not ",
                                                     volume_state_name(from)));
}

Status insert_release_on(Conn& c, const std::string& volume_id, const std::string& instance,
                         int64_t time) {
  return c
      .exec("insert release", "INSERT INTO releases(volume_id, instance, time) VALUES($1, $2, $3)",
            Params().text(volume_id).text(instance).int8(time))
      .status();
}

// Counts `count`'s instance's releases in its period and records this one
// if there are fewer than its max, inside the caller's transaction. The
// instance's advisory lock makes replicas counting the same instance take
// turns (two could otherwise both count max - 1).
Status count_release(Conn& c, const CountedRelease& count) {
  const std::string key = str_cat(count.volume_id, "\n", count.instance);
  KEYGATE_RETURN_IF_ERROR(
      c.exec("lock the instance's releases",
             "SELECT 1 FROM (SELECT pg_advisory_xact_lock(hashtextextended($1, 0))) l",
             Params().text(key))
          .status());
  KEYGATE_RETURN_IF_ERROR(
      c.exec("prune releases",
             "DELETE FROM releases WHERE volume_id = $1 AND instance = $2 AND time < $3",
             Params().text(count.volume_id).text(count.instance).int8(count.since))
          .status());
  auto n = c.exec("count releases",
                  "SELECT count(*) FROM releases WHERE volume_id = $1 AND instance = $2",
                  Params().text(count.volume_id).text(count.instance));
  if (!n.is_ok()) return n.status();
  const int64_t released = n->int8(0, 0);
  if (released >= count.max) {
    return Status::error(ErrorKind::kRefused,
                         str_cat(released, " releases to instance ", count.instance,
                                 " within the period already (at most ", count.max, ")"));
  }
  return insert_release_on(c, count.volume_id, count.instance, count.now);
}

// The inserts the store's calls and migrate-store's copy share.
Status insert_token_on(Conn& c, const Bytes& token_hash, const std::string& template_json,
                       int64_t expires_at, int64_t uses) {
  return c
      .exec("insert enrollment token",
            "INSERT INTO enrollment_tokens(token_hash, template, expires_at, uses_left) VALUES($1, "
            "$2, $3, $4)",
            Params().bytes(token_hash).text(template_json).int8(expires_at).int8(uses))
      .status();
}

Status insert_approval_on(Conn& c, const ApprovalRecord& r) {
  return c
      .exec("insert approval",
            "INSERT INTO approvals(id, volume_id, instance, state, record, created_at, expires_at) "
            "VALUES($1, $2, $3, $4, $5, $6, $7)",
            Params()
                .text(r.id)
                .text(r.volume_id)
                .text(r.instance)
                .text(r.state)
                .text(r.record)
                .int8(r.created_at)
                .int8(r.expires_at))
      .status();
}

Status insert_admin_cert_on(Conn& c, const AdminCertRecord& r) {
  return c
      .exec("insert admin certificate",
            "INSERT INTO admin_certs(serial, name, role, issued_by, issued_at, expires_at, "
            "revoked_at) "
            "VALUES($1, $2, $3, $4, $5, $6, $7)",
            Params()
                .text(r.serial)
                .text(r.name)
                .text(r.role)
                .text(r.issued_by)
                .int8(r.issued_at)
                .int8(r.expires_at)
                .int8(r.revoked_at))
      .status();
}

class PgStore final : public Store {
 public:
  PgStore(std::string conninfo, int connections) : pool_(std::move(conninfo), connections) {}

  // Bounds the challenges outstanding across the replicas (checked once a
  // second per replica, so it may be passed by a second's worth).
  static constexpr int64_t kMaxOutstanding = 200000;

  Status put_nonce(const Bytes& nonce, int64_t now, int64_t expires_at) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    if (prune_due(now)) {
      KEYGATE_RETURN_IF_ERROR((*c)->exec("forget expired nonces",
                                         "DELETE FROM nonces WHERE expires_at < $1",
                                         Params().int8(now))
                                  .status());
      auto n = (*c)->exec("count nonces", "SELECT count(*) FROM nonces");
      if (!n.is_ok()) return n.status();
      nonces_full_ = n->int8(0, 0) >= kMaxOutstanding;
    }
    if (nonces_full_)
      return Status::error(ErrorKind::kUnavailable, "too many outstanding challenges");
    return (*c)
        ->exec("insert nonce", "INSERT INTO nonces(nonce, expires_at) VALUES($1, $2)",
               Params().bytes(nonce).int8(expires_at))
        .status();
  }

  Result<bool> consume_nonce(const Bytes& nonce, int64_t now) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    auto r = (*c)->exec("consume nonce", "DELETE FROM nonces WHERE nonce = $1 RETURNING expires_at",
                        Params().bytes(nonce));
    if (!r.is_ok()) return r.status();
    return r->count() == 1 && now <= r->int8(0, 0);
  }

  Result<int64_t> count_nonces(int64_t now) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    auto r = (*c)->exec("count nonces", "SELECT count(*) FROM nonces WHERE expires_at >= $1", Params().int8(now));
    if (!r.is_ok()) return r.status();
    return r->int8(0, 0);
  }

  Status create_enrollment_token(const Bytes& token_hash, const std::string& template_json,
                                 int64_t expires_at, int uses, const AuditEvent& event) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    Conn& conn = **c;
    return in_transaction(conn, "enrollment token", [&]() -> Status {
      KEYGATE_RETURN_IF_ERROR(insert_token_on(conn, token_hash, template_json, expires_at, uses));
      return insert_audit(conn, event);
    });
  }

  Result<std::string> peek_enrollment_token(const Bytes& token_hash, int64_t now) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    auto r = (*c)->exec("select enrollment token",
                        "SELECT template FROM enrollment_tokens "
                        "WHERE token_hash = $1 AND uses_left > 0 AND expires_at >= $2",
                        Params().bytes(token_hash).int8(now));
    if (!r.is_ok()) return r.status();
    if (r->count() == 0)
      return Status::error(ErrorKind::kRefused, "enrollment token unknown, used up or expired");
    return r->text(0, 0);
  }

  Status record_enrollment(const Bytes* token_hash, int64_t now, const VolumeRecord& record,
                           const AuditEvent& event) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    Conn& conn = **c;
    return in_transaction(conn, "enrollment", [&]() -> Status {
      if (token_hash != nullptr) {
        auto u = conn.exec("use enrollment token",
                           "UPDATE enrollment_tokens SET uses_left = uses_left - 1 "
                           "WHERE token_hash = $1 AND uses_left > 0 AND expires_at >= $2",
                           Params().bytes(*token_hash).int8(now));
        if (!u.is_ok()) return u.status();
        if (u->affected() != 1) {
          return Status::error(ErrorKind::kRefused, "enrollment token unknown, used up or expired");
        }
      }
      KEYGATE_RETURN_IF_ERROR(insert_volume_on(conn, record));
      return insert_audit(conn, event);
    });
  }

  Status insert_volume(const VolumeRecord& record) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    return insert_volume_on(**c, record);
  }

  Result<VolumeRecord> get_volume(const std::string& id) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    auto r =
        (*c)->exec("select volume",
                   "SELECT id, state, policy, sealed_secret, description, created_at, updated_at "
                   "FROM volumes WHERE id = $1",
                   Params().text(id));
    if (!r.is_ok()) return r.status();
    if (r->count() == 0) return Status::error(ErrorKind::kNotFound, str_cat("no volume ", id));
    return read_volume(*r, 0);
  }

  Status transition_volume(const std::string& id, VolumeState from, VolumeState to,
                           int64_t now) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    return transition(**c, id, from, to, now);
  }

  Status revoke_volume(const std::string& id, VolumeState from, int64_t now,
                       const AuditEvent& event) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    Conn& conn = **c;
    return in_transaction(conn, "revocation", [&]() -> Status {
      KEYGATE_RETURN_IF_ERROR(transition(conn, id, from, VolumeState::kRevoked, now));
      return insert_audit(conn, event);
    });
  }

  Status update_volume_policy(const std::string& id, const std::string& expected,
                              const std::string& updated, int64_t now) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    auto u =
        (*c)->exec("update volume policy",
                   "UPDATE volumes SET policy = $1, updated_at = $2 WHERE id = $3 AND policy = $4",
                   Params().text(updated).int8(now).text(id).text(expected));
    if (!u.is_ok()) return u.status();
    if (u->affected() == 1) return Status::ok();
    auto q = (*c)->exec("select volume", "SELECT 1 FROM volumes WHERE id = $1", Params().text(id));
    if (!q.is_ok()) return q.status();
    if (q->count() == 0) return Status::error(ErrorKind::kNotFound, str_cat("no volume ", id));
    return Status::error(ErrorKind::kConflict,
                         str_cat("volume ", id, ": policy changed meanwhile"));
  }

  Result<std::vector<VolumeRecord>> list_volumes() override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    auto r =
        (*c)->exec("list volumes",
                   "SELECT id, state, policy, sealed_secret, description, created_at, updated_at "
                   "FROM volumes ORDER BY created_at, id");
    if (!r.is_ok()) return r.status();
    std::vector<VolumeRecord> out;
    for (int i = 0; i < r->count(); ++i) {
      auto v = read_volume(*r, i);
      if (!v.is_ok()) return v.status();
      out.push_back(std::move(v).value());
    }
    return out;
  }

  Result<std::vector<std::string>> expire_pending(int64_t created_before, int64_t now,
                                                  const AuditEvent& event) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    Conn& conn = **c;
    std::vector<std::string> ids;
    Status status = in_transaction(conn, "expiry", [&]() -> Status {
      auto r = conn.exec("expire pending volumes",
                         "UPDATE volumes SET state = 'revoked', updated_at = $1 "
                         "WHERE state = 'pending' AND created_at < $2 RETURNING id",
                         Params().int8(now).int8(created_before));
      if (!r.is_ok()) return r.status();
      for (int i = 0; i < r->count(); ++i) ids.push_back(r->text(i, 0));
      std::sort(ids.begin(), ids.end());
      for (const std::string& id : ids) {
        AuditEvent e = event;
        e.volume_id = id;
        KEYGATE_RETURN_IF_ERROR(insert_audit(conn, e));
      }
      return Status::ok();
    });
    if (!status.is_ok()) return status;
    return ids;
  }

  Status insert_approval(const ApprovalRecord& r, const AuditEvent& event) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    Conn& conn = **c;
    return in_transaction(conn, "approval request", [&]() -> Status {
      KEYGATE_RETURN_IF_ERROR(insert_approval_on(conn, r));
      return insert_audit(conn, event);
    });
  }

  Result<ApprovalRecord> get_approval(const std::string& id) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    auto r = (*c)->exec(
        "select approval",
        "SELECT id, volume_id, instance, state, record, created_at, expires_at FROM approvals "
        "WHERE id = $1",
        Params().text(id));
    if (!r.is_ok()) return r.status();
    if (r->count() == 0)
      return Status::error(ErrorKind::kNotFound, str_cat("no approval request ", id));
    return read_approval(*r, 0);
  }

  Result<std::optional<ApprovalRecord>> find_pending_approval(
      const std::string& volume_id, const std::string& instance) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    auto r = (*c)->exec(
        "look up approval",
        "SELECT id, volume_id, instance, state, record, created_at, expires_at FROM approvals "
        "WHERE volume_id = $1 AND instance = $2 AND state = 'pending' "
        "ORDER BY created_at DESC, id LIMIT 1",
        Params().text(volume_id).text(instance));
    if (!r.is_ok()) return r.status();
    if (r->count() == 0) return std::optional<ApprovalRecord>();
    return std::optional<ApprovalRecord>(read_approval(*r, 0));
  }

  Result<std::vector<ApprovalRecord>> list_approvals(bool pending_only, int limit) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    auto r = (*c)->exec(
        "list approvals",
        "SELECT id, volume_id, instance, state, record, created_at, expires_at FROM approvals "
        "WHERE state = 'pending' OR $1 = 0 ORDER BY created_at DESC, id LIMIT $2",
        Params().int8(pending_only ? 1 : 0).int8(limit));
    if (!r.is_ok()) return r.status();
    std::vector<ApprovalRecord> out;
    for (int i = 0; i < r->count(); ++i) out.push_back(read_approval(*r, i));
    return out;
  }

  Status update_approval(const ApprovalRecord& expected, const ApprovalRecord& updated,
                         const AuditEvent& event, const CountedRelease* count) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    Conn& conn = **c;
    return in_transaction(conn, "approval change", [&]() -> Status {
      if (count != nullptr) KEYGATE_RETURN_IF_ERROR(count_release(conn, *count));
      auto u = conn.exec("update approval",
                         "UPDATE approvals SET state = $1, record = $2 WHERE id = $3 AND state = "
                         "$4 AND record = $5",
                         Params()
                             .text(updated.state)
                             .text(updated.record)
                             .text(expected.id)
                             .text(expected.state)
                             .text(expected.record));
      if (!u.is_ok()) return u.status();
      if (u->affected() != 1) {
        auto q = conn.exec("select approval", "SELECT 1 FROM approvals WHERE id = $1",
                           Params().text(expected.id));
        if (!q.is_ok()) return q.status();
        if (q->count() == 0)
          return Status::error(ErrorKind::kNotFound, str_cat("no approval request ", expected.id));
        return Status::error(ErrorKind::kConflict,
                             str_cat("approval request ", expected.id, " changed meanwhile"));
      }
      return insert_audit(conn, event);
    });
  }

  Status record_counted_release(const CountedRelease& count, const AuditEvent& event) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    Conn& conn = **c;
    return in_transaction(conn, "counted release", [&]() -> Status {
      KEYGATE_RETURN_IF_ERROR(count_release(conn, count));
      return insert_audit(conn, event);
    });
  }

  Status insert_admin_cert(const AdminCertRecord& r, const AuditEvent& event) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    Conn& conn = **c;
    return in_transaction(conn, "admin certificate", [&]() -> Status {
      KEYGATE_RETURN_IF_ERROR(insert_admin_cert_on(conn, r));
      return insert_audit(conn, event);
    });
  }

  Result<AdminCertRecord> get_admin_cert(const std::string& serial) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    auto r = (*c)->exec(
        "select admin certificate",
        "SELECT serial, name, role, issued_by, issued_at, expires_at, revoked_at FROM admin_certs "
        "WHERE serial = $1",
        Params().text(serial));
    if (!r.is_ok()) return r.status();
    if (r->count() == 0)
      return Status::error(ErrorKind::kNotFound, str_cat("no admin certificate ", serial));
    return read_admin_cert(*r, 0);
  }

  Result<std::vector<AdminCertRecord>> list_admin_certs() override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    auto r = (*c)->exec(
        "list admin certificates",
        "SELECT serial, name, role, issued_by, issued_at, expires_at, revoked_at FROM admin_certs "
        "ORDER BY issued_at, serial");
    if (!r.is_ok()) return r.status();
    std::vector<AdminCertRecord> out;
    for (int i = 0; i < r->count(); ++i) out.push_back(read_admin_cert(*r, i));
    return out;
  }

  Status revoke_admin_cert(const std::string& serial, int64_t now,
                           const AuditEvent& event) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    Conn& conn = **c;
    return in_transaction(conn, "admin certificate revocation", [&]() -> Status {
      auto u =
          conn.exec("revoke admin certificate",
                    "UPDATE admin_certs SET revoked_at = $1 WHERE serial = $2 AND revoked_at = 0",
                    Params().int8(now).text(serial));
      if (!u.is_ok()) return u.status();
      if (u->affected() != 1) {
        auto q = conn.exec("select admin certificate",
                           "SELECT 1 FROM admin_certs WHERE serial = $1", Params().text(serial));
        if (!q.is_ok()) return q.status();
        if (q->count() == 0)
          return Status::error(ErrorKind::kNotFound, str_cat("no admin certificate ", serial));
        return Status::error(ErrorKind::kConflict,
                             str_cat("admin certificate ", serial, " is already revoked"));
      }
      return insert_audit(conn, event);
    });
  }

  bool shares_policy() const override { return true; }

  Result<int64_t> publish_policy(const PolicyVersion& p, const AuditEvent& event) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    Conn& conn = **c;
    int64_t version = 0;
    Status st = in_transaction(conn, "policy publication", [&]() -> Status {
      auto r = conn.exec(
          "insert policy version",
          "INSERT INTO policy_versions(sha256, text, loaded_by, loaded_at) VALUES($1, $2, $3, $4) "
          "RETURNING version",
          Params().text(p.sha256).text(p.text).text(p.loaded_by).int8(event.time));
      if (!r.is_ok()) return r.status();
      version = r->int8(0, 0);
      AuditEvent e = event;
      e.detail += str_cat(", version ", version);
      return insert_audit(conn, e);
    });
    if (!st.is_ok()) return st;
    return version;
  }

  Result<PolicyVersion> latest_policy(bool with_text) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    auto r = with_text ? (*c)->exec("read the policy in force",
                                    "SELECT version, sha256, text, loaded_by FROM policy_versions "
                                    "ORDER BY version DESC LIMIT 1")
                       : (*c)->exec("read the policy version in force",
                                    "SELECT version, sha256, '', '' FROM policy_versions ORDER BY "
                                    "version DESC LIMIT 1");
    if (!r.is_ok()) return r.status();
    PolicyVersion p;
    if (r->count() == 1)
      p = PolicyVersion{r->int8(0, 0), r->text(0, 1), r->text(0, 2), r->text(0, 3)};
    return p;
  }

  bool shares_rate_limits() const override { return true; }

  // One statement, atomic under concurrent replicas (the row's lock), on
  // the database's clock (one clock for every replica). `refused` counts the
  // refusals since the key last got through: the first of a burst is 1.
  Result<RateTake> take_rate_token(const std::string& key, double per_second,
                                   double burst) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    if (prune_due(static_cast<int64_t>(::time(nullptr)), &last_bucket_prune_)) {
      KEYGATE_RETURN_IF_ERROR((*c)->exec("forget full buckets",
                                         "DELETE FROM rate_buckets WHERE full_at_ms < "
                                         "(extract(epoch FROM clock_timestamp()) * 1000)::bigint")
                                  .status());
    }
    // level: the bucket refilled to now (EXCLUDED.at_ms: the database's
    // clock, read once by the INSERT).
#define KEYGATE_LEVEL "LEAST($2, b.tokens + GREATEST(EXCLUDED.at_ms - b.at_ms, 0) * $3 / 1000.0)"
    auto r = (*c)->exec(
        "take a rate token",
        "INSERT INTO rate_buckets AS b (key, tokens, at_ms, refused, full_at_ms) "
        "SELECT $1, $2 - 1, n.ms, 0, n.ms + (1000 / $3)::bigint "
        "FROM (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ms) n "
        "ON CONFLICT (key) DO UPDATE SET "
        "  tokens = CASE WHEN " KEYGATE_LEVEL " >= 1 THEN " KEYGATE_LEVEL " - 1 ELSE " KEYGATE_LEVEL
        " END, "
        "  at_ms = GREATEST(EXCLUDED.at_ms, b.at_ms), "
        "  refused = CASE WHEN " KEYGATE_LEVEL
        " >= 1 THEN 0 ELSE b.refused + 1 END, "
        "  full_at_ms = EXCLUDED.at_ms + (($2 - " KEYGATE_LEVEL
        " + 1) * 1000 / $3)::bigint "
        "RETURNING b.tokens, b.refused",
        Params().text(key).float8(burst).float8(per_second));
#undef KEYGATE_LEVEL
    if (!r.is_ok()) return r.status();
    RateTake take;
    if (r->count() != 1) return take;
    const double tokens = r->float8(0, 0);
    const int64_t refused = r->int8(0, 1);
    take.allowed = refused == 0;
    take.burst_start = refused == 1;
    if (!take.allowed)
      take.retry_after_ms = static_cast<int64_t>(std::ceil((1 - tokens) / per_second * 1000));
    return take;
  }

  // Concurrent appends share one transaction (GroupCommit).
  Status append_audit(const AuditEvent& e) override { return audit_group_.append(e); }

  Result<std::vector<AuditEvent>> recent_audit(int limit) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    auto r = (*c)->exec("select audit",
                        "SELECT time, event, outcome, volume_id, peer, detail FROM "
                        "(SELECT * FROM audit ORDER BY seq DESC LIMIT $1) a ORDER BY seq",
                        Params().int8(limit));
    if (!r.is_ok()) return r.status();
    std::vector<AuditEvent> out;
    for (int i = 0; i < r->count(); ++i) {
      out.push_back(AuditEvent{r->int8(i, 0), r->text(i, 1), r->text(i, 2), r->text(i, 3),
                               r->text(i, 4), r->text(i, 5)});
    }
    return out;
  }

  Result<std::vector<AuditRecord>> read_audit(int64_t after_seq, int limit) override {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    auto r = (*c)->exec(
        "read audit",
        "SELECT seq, time, event, outcome, volume_id, peer, detail, prev_hash, hash FROM audit "
        "WHERE seq > $1 ORDER BY seq LIMIT $2",
        Params().int8(after_seq).int8(limit));
    if (!r.is_ok()) return r.status();
    std::vector<AuditRecord> out;
    for (int i = 0; i < r->count(); ++i) {
      out.push_back(AuditRecord{r->int8(i, 0),
                                AuditEvent{r->int8(i, 1), r->text(i, 2), r->text(i, 3),
                                           r->text(i, 4), r->text(i, 5), r->text(i, 6)},
                                r->bytes(i, 7), r->bytes(i, 8)});
    }
    return out;
  }

  // Brings the database to this server's schema, in one transaction under
  // the migration lock (two replicas starting together: one migrates, the
  // other then finds it done). A database newer than this server is refused.
  Status migrate() {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    Conn& conn = **c;
    return in_transaction(conn, "schema migration", [&]() -> Status {
      // Another replica's migration may take longer than a lock wait is
      // otherwise allowed: wait for it as long as for any one statement.
      KEYGATE_RETURN_IF_ERROR(conn.command("wait for the migration lock",
                                           "SET LOCAL lock_timeout = '30s'"));
      KEYGATE_RETURN_IF_ERROR(conn.exec("take the migration lock",
                                        "SELECT 1 FROM (SELECT pg_advisory_xact_lock($1)) l",
                                        Params().int8(kMigrationLock))
                                  .status());
      KEYGATE_RETURN_IF_ERROR(
          conn.command("create the schema table",
                       "CREATE TABLE IF NOT EXISTS keygate_schema (version BIGINT NOT NULL)"));
      auto v = conn.exec("read the schema version", "SELECT version FROM keygate_schema");
      if (!v.is_ok()) return v.status();
      if (v->count() > 1)
        return Status::error(ErrorKind::kIo, "store: keygate_schema holds more than one row");
      const int64_t version = v->count() == 1 ? v->int8(0, 0) : 0;
      if (version > kSchemaVersion) {
        return Status::error(
            ErrorKind::kInvalidArgument,
            str_cat("the database's keygate schema is version ", version,
                    ", newer than this keygate-server knows (", kSchemaVersion,
                    "): run a keygate-server at least as new as the one that upgraded it"));
      }
      if (version == kSchemaVersion) return Status::ok();
      for (int64_t next = version + 1; next <= kSchemaVersion; ++next) {
        KEYGATE_RETURN_IF_ERROR(conn.command(str_cat("migrate to schema version ", next).c_str(),
                                             kMigrations[next - 1]));
      }
      const char* set = v->count() == 1 ? "UPDATE keygate_schema SET version = $1"
                                        : "INSERT INTO keygate_schema(version) VALUES($1)";
      return conn.exec("record the schema version", set, Params().int8(kSchemaVersion)).status();
    });
  }

  // migrate-store's copy (server/store.h load_postgres_store).
  Status load(const StoreDump& d, const AuditEvent& event) {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    Conn& conn = **c;
    // Text a PostgreSQL TEXT column cannot hold would be changed on the way:
    // refused, except a volume's description, which is only shown.
    auto exact = [](const std::string& s) { return pg_text(s) == s; };
    for (const VolumeRecord& v : d.volumes) {
      if (!exact(v.id) || !exact(v.policy_json)) {
        return Status::error(
            ErrorKind::kInvalidArgument,
            str_cat("volume ", printable(v.id, 80), ": its id or policy is not UTF-8 text"));
      }
    }
    for (const ApprovalRecord& a : d.approvals) {
      if (!exact(a.id) || !exact(a.volume_id) || !exact(a.instance) || !exact(a.state) ||
          !exact(a.record)) {
        return Status::error(
            ErrorKind::kInvalidArgument,
            str_cat("approval request ", printable(a.id, 80), " is not UTF-8 text"));
      }
    }
    return in_transaction(conn, "store copy", [&]() -> Status {
      KEYGATE_RETURN_IF_ERROR(conn.command("lock the tables",
                                           "LOCK TABLE volumes, enrollment_tokens, approvals, "
                                           "releases, admin_certs, audit, audit_head "
                                           "IN EXCLUSIVE MODE"));
      auto n = conn.exec(
          "count what is there",
          "SELECT (SELECT count(*) FROM volumes) + (SELECT count(*) FROM enrollment_tokens) + "
          "(SELECT count(*) FROM approvals) + (SELECT count(*) FROM admin_certs) + "
          "(SELECT count(*) FROM audit)");
      if (!n.is_ok()) return n.status();
      if (n->int8(0, 0) != 0) {
        return Status::error(
            ErrorKind::kConflict,
            "the PostgreSQL database holds a keygate store already; copy into an empty one");
      }
      for (const VolumeRecord& v : d.volumes) KEYGATE_RETURN_IF_ERROR(insert_volume_on(conn, v));
      for (const StoreDump::Token& tk : d.tokens) {
        KEYGATE_RETURN_IF_ERROR(
            insert_token_on(conn, tk.token_hash, tk.template_json, tk.expires_at, tk.uses_left));
      }
      for (const ApprovalRecord& a : d.approvals)
        KEYGATE_RETURN_IF_ERROR(insert_approval_on(conn, a));
      for (const StoreDump::Release& r : d.releases) {
        KEYGATE_RETURN_IF_ERROR(insert_release_on(conn, r.volume_id, r.instance, r.time));
      }
      for (const AdminCertRecord& r : d.admin_certs)
        KEYGATE_RETURN_IF_ERROR(insert_admin_cert_on(conn, r));
      for (const AuditRecord& r : d.audit) KEYGATE_RETURN_IF_ERROR(insert_audit_record(conn, r));
      KEYGATE_RETURN_IF_ERROR(conn.exec("set the audit head", "UPDATE audit_head SET seq = $1",
                                        Params().int8(d.audit_last_seq))
                                  .status());
      return insert_audit(conn, event);
    });
  }

 private:
  static Status insert_volume_on(Conn& c, const VolumeRecord& r) {
    return c
        .exec("insert volume",
              "INSERT INTO volumes(id, state, policy, sealed_secret, description, created_at, "
              "updated_at) "
              "VALUES($1, $2, $3, $4, $5, $6, $7)",
              Params()
                  .text(r.id)
                  .text(volume_state_name(r.state))
                  .text(r.policy_json)
                  .bytes(r.sealed_secret)
                  .text(r.description)
                  .int8(r.created_at)
                  .int8(r.updated_at))
        .status();
  }

  // True once a second (per replica): time to forget expired nonces and
  // count the outstanding ones again.
  bool prune_due(int64_t now, int64_t* last = nullptr) {
    std::lock_guard<std::mutex> lock(prune_mu_);
    int64_t& at = last != nullptr ? *last : last_prune_;
    if (now == at) return false;
    at = now;
    return true;
  }

  Status commit_audit_group(const std::vector<AuditEvent>& events) {
    auto c = pool_.acquire();
    if (!c.is_ok()) return c.status();
    Conn& conn = **c;
    return in_transaction(conn, "audit group", [&]() { return insert_audit(conn, events); });
  }

  Pool pool_;
  std::mutex prune_mu_;
  int64_t last_prune_ = 0;
  int64_t last_bucket_prune_ = 0;
  std::atomic<bool> nonces_full_{false};
  GroupCommit audit_group_{
      [this](const std::vector<AuditEvent>& events) { return commit_audit_group(events); }};
};

}  // namespace

Status check_postgres_conninfo(const std::string& conninfo) {
  char* err = nullptr;
  PQconninfoOption* opts = PQconninfoParse(conninfo.c_str(), &err);
  if (opts == nullptr) {
    // libpq's message may quote the string: say only what is wrong.
    std::string msg = err != nullptr ? pg_message(err) : "out of memory";
    PQfreemem(err);
    if (msg.find('"') != std::string::npos) msg = "it does not parse";
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("store: bad PostgreSQL connection string: ", msg));
  }
  bool has_password = false;
  for (PQconninfoOption* o = opts; o->keyword != nullptr; ++o) {
    if (std::string(o->keyword) == "password" && o->val != nullptr && o->val[0] != '\0')
      has_password = true;
  }
  PQconninfoFree(opts);
  if (has_password) {
    return Status::error(
        ErrorKind::kInvalidArgument,
        "store: the PostgreSQL connection string holds a password; put it in a password file "
        "(passfile=, PGPASSFILE or ~/.pgpass) or a service file instead");
  }
  return Status::ok();
}

Status load_postgres_store(const std::string& conninfo, const StoreDump& dump,
                           const AuditEvent& event) {
  KEYGATE_RETURN_IF_ERROR(check_postgres_conninfo(conninfo));
  PgStore store(conninfo, 1);
  KEYGATE_RETURN_IF_ERROR(store.migrate());
  return store.load(dump, event);
}

Result<std::unique_ptr<Store>> open_postgres_store(const std::string& conninfo, int connections) {
  KEYGATE_RETURN_IF_ERROR(check_postgres_conninfo(conninfo));
  auto store = std::make_unique<PgStore>(conninfo, connections);
  Status migrated = store->migrate();
  if (!migrated.is_ok()) return migrated;
  return std::unique_ptr<Store>(std::move(store));
}

}  // namespace keygate::server
