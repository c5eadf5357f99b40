#include <gtest/gtest.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <thread>

#include "core/crypto.h"
#include "server/audit_chain.h"
#include "server/key_service.h"
#include "server/state_files.h"
#include "server/store.h"
#include "tests/memory_store.h"
#include "tests/pg_cluster.h"

namespace keygate::server {
namespace {

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/keygate-store-XXXXXX";
    dir_ = mkdtemp(tmpl);
    auto s = open_sqlite_store(dir_ + "/keygate.db");
    ASSERT_TRUE(s.is_ok()) << s.status().message();
    store_ = std::move(s).value();
  }
  void TearDown() override {
    store_.reset();
    std::string cmd = "rm -rf '" + dir_ + "'";
    ASSERT_EQ(system(cmd.c_str()), 0);
  }
  std::string dir_;
  std::unique_ptr<Store> store_;
};

// The contract of server/store.h, on SQLite and on the in-memory store the
// KeyService unit tests use: the fake behaves like the real one.
// On PostgreSQL, each test has a database of its own in the run's cluster
// (tests/pg_cluster.h).
class StoreContract : public StoreTest, public ::testing::WithParamInterface<std::string> {
 protected:
  void SetUp() override {
    StoreTest::SetUp();
    if (GetParam() == "memory") store_ = std::make_unique<MemoryStore>();
    if (GetParam() == "postgres") {
      testing::PgCluster& pg = testing::PgCluster::shared();
      ASSERT_EQ(pg.error(), "");
      conninfo_ = pg.create_database();
      ASSERT_NE(conninfo_, "");
      auto s = open_postgres_store(conninfo_);
      ASSERT_TRUE(s.is_ok()) << s.status().message();
      store_ = std::move(s).value();
    }
  }
  // Runs SQL on the store's database behind its back (SQLite or
  // PostgreSQL); "" or the error.
  std::string raw_sql(const std::string& sqlite_sql, const std::string& pg_sql);
  // Every insert into the trail fails (as on a full disk), or works again;
  // "" or the error.
  std::string fail_audit_writes(bool failing);
  std::string conninfo_;  // PostgreSQL only
};

INSTANTIATE_TEST_SUITE_P(Stores, StoreContract, ::testing::Values("sqlite", "memory", "postgres"),
                         [](const auto& p) { return p.param; });

// The databases' own: SQL run on them behind the store's back.
class DurableStoreContract : public StoreContract {};
INSTANTIATE_TEST_SUITE_P(Stores, DurableStoreContract, ::testing::Values("sqlite", "postgres"),
                         [](const auto& p) { return p.param; });

TEST_F(StoreTest, FileIsPrivate) {
  struct stat st;
  ASSERT_EQ(stat((dir_ + "/keygate.db").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 077, 0u);
}

TEST_P(StoreContract, NonceIsSingleUseAndExpires) {
  Bytes n = random_bytes(32);
  ASSERT_TRUE(store_->put_nonce(n, 0, 100).is_ok());
  EXPECT_TRUE(store_->consume_nonce(n, 50).value());
  EXPECT_FALSE(store_->consume_nonce(n, 50).value());  // reused
  Bytes m = random_bytes(32);
  ASSERT_TRUE(store_->put_nonce(m, 0, 100).is_ok());
  EXPECT_FALSE(store_->consume_nonce(m, 101).value());  // expired
  EXPECT_FALSE(store_->consume_nonce(random_bytes(32), 0).value());  // unknown
  // Expired nonces are forgotten when new ones are recorded.
  Bytes old = random_bytes(32);
  ASSERT_TRUE(store_->put_nonce(old, 0, 10).is_ok());
  ASSERT_TRUE(store_->put_nonce(random_bytes(32), 20, 30).is_ok());
  EXPECT_FALSE(store_->consume_nonce(old, 5).value());
}

TEST_F(StoreTest, NoncesAreNotWrittenToDisk) {
  Bytes n = random_bytes(32);
  ASSERT_TRUE(store_->put_nonce(n, 0, 100).is_ok());
  // A durable write of the same bytes is found where the nonce is not.
  VolumeRecord marker{"vol-marker", VolumeState::kPending, "{}", n, "", 1, 1};
  ASSERT_TRUE(store_->insert_volume(marker).is_ok());
  const std::string needle(as_string_view(n));
  auto count = [&](const std::string& file) {
    std::string content = read_small_file(dir_ + file, 8 << 20).value();
    size_t hits = 0;
    for (size_t at = content.find(needle); at != std::string::npos;
         at = content.find(needle, at + 1)) {
      ++hits;
    }
    return hits;
  };
  // The marker row holds the bytes once; a persisted nonce would add more.
  EXPECT_EQ(count("/keygate.db") + count("/keygate.db-wal"), 1u);
}

VolumeRecord pending_volume(const std::string& id) {
  return VolumeRecord{id, VolumeState::kPending, "{}", random_bytes(60), "", 1, 1};
}
AuditEvent registered(const std::string& id) {
  return AuditEvent{1, "enroll.register", "ok", id, "peer", "by token"};
}
AuditEvent token_created() { return AuditEvent{1, "token.create", "ok", "", "local", "{}"}; }

TEST_P(StoreContract, EnrollmentTokenUsesAndExpiry) {
  Bytes h = sha256("token");
  ASSERT_TRUE(store_->create_enrollment_token(h, "{\"t\":1}", 100, 2, token_created()).is_ok());
  // Looking does not spend a use; recording an enrollment does.
  EXPECT_EQ(store_->peek_enrollment_token(h, 10).value(), "{\"t\":1}");
  EXPECT_TRUE(store_->peek_enrollment_token(h, 10).is_ok());
  EXPECT_TRUE(store_->record_enrollment(&h, 10, pending_volume("v1"), registered("v1")).is_ok());
  EXPECT_TRUE(store_->record_enrollment(&h, 10, pending_volume("v2"), registered("v2")).is_ok());
  EXPECT_EQ(store_->peek_enrollment_token(h, 10).status().kind(), ErrorKind::kRefused);
  EXPECT_EQ(store_->record_enrollment(&h, 10, pending_volume("v3"), registered("v3")).kind(),
            ErrorKind::kRefused);
  Bytes g = sha256("other");
  ASSERT_TRUE(store_->create_enrollment_token(g, "{}", 100, 1, token_created()).is_ok());
  EXPECT_FALSE(store_->peek_enrollment_token(g, 101).is_ok());
  EXPECT_EQ(store_->record_enrollment(&g, 101, pending_volume("v4"), registered("v4")).kind(),
            ErrorKind::kRefused);
  EXPECT_EQ(store_->list_volumes()->size(), 2u);
  EXPECT_EQ(store_->recent_audit(10)->size(), 4u);  // two tokens, two enrollments
}

// A token and its record on the trail are one write: while the trail
// cannot take the record, no token exists (none could be handed out
// unrecorded).
TEST_P(StoreContract, ATokenAndItsRecordAreWrittenTogether) {
  ASSERT_EQ(fail_audit_writes(true), "");
  const Bytes h = sha256("unrecorded");
  EXPECT_FALSE(store_->create_enrollment_token(h, "{}", 100, 1, token_created()).is_ok());
  EXPECT_EQ(store_->peek_enrollment_token(h, 10).status().kind(), ErrorKind::kRefused);
  ASSERT_EQ(fail_audit_writes(false), "");
  ASSERT_TRUE(store_->create_enrollment_token(h, "{}", 100, 1, token_created()).is_ok());
  EXPECT_TRUE(store_->peek_enrollment_token(h, 10).is_ok());
  auto trail = store_->recent_audit(10).value();
  ASSERT_EQ(trail.size(), 1u);
  EXPECT_EQ(trail[0].event, "token.create");
}

TEST_P(StoreContract, ExpiryRevokesOnlyOldPendingVolumesEachOnTheRecord) {
  auto volume = [](const std::string& id, VolumeState state, int64_t created) {
    return VolumeRecord{id, state, "{}", random_bytes(60), "", created, created};
  };
  ASSERT_TRUE(store_->insert_volume(volume("old-pending", VolumeState::kPending, 100)).is_ok());
  ASSERT_TRUE(store_->insert_volume(volume("new-pending", VolumeState::kPending, 200)).is_ok());
  ASSERT_TRUE(store_->insert_volume(volume("old-active", VolumeState::kActive, 100)).is_ok());
  const AuditEvent event{300, "enroll.expire", "ok", "", "local", "not confirmed"};
  auto expired = store_->expire_pending(150, 300, event);
  ASSERT_TRUE(expired.is_ok()) << expired.status().message();
  EXPECT_EQ(expired.value(), std::vector<std::string>{"old-pending"});
  EXPECT_EQ(store_->get_volume("old-pending")->state, VolumeState::kRevoked);
  EXPECT_EQ(store_->get_volume("new-pending")->state, VolumeState::kPending);
  EXPECT_EQ(store_->get_volume("old-active")->state, VolumeState::kActive);
  auto trail = store_->recent_audit(10).value();
  ASSERT_EQ(trail.size(), 1u);
  EXPECT_EQ(trail[0].event, "enroll.expire");
  EXPECT_EQ(trail[0].volume_id, "old-pending");
  // Nothing left to expire: nothing more on the trail.
  EXPECT_TRUE(store_->expire_pending(150, 301, event)->empty());
  EXPECT_EQ(store_->recent_audit(10)->size(), 1u);
}

TEST_P(StoreContract, AnEnrollmentIsRecordedWholeOrNotAtAll) {
  Bytes h = sha256("token");
  ASSERT_TRUE(store_->create_enrollment_token(h, "{}", 100, 1, token_created()).is_ok());
  ASSERT_TRUE(store_->insert_volume(pending_volume("taken")).is_ok());
  // The volume cannot be inserted (its id is taken): the token's use and
  // the audit record are not written either.
  EXPECT_FALSE(store_->record_enrollment(&h, 10, pending_volume("taken"), registered("taken")).is_ok());
  EXPECT_TRUE(store_->peek_enrollment_token(h, 10).is_ok());
  EXPECT_EQ(store_->recent_audit(10)->size(), 1u);  // the token's own record only
  // A used-up token: no volume, no audit row.
  ASSERT_TRUE(store_->record_enrollment(&h, 10, pending_volume("first"), registered("first")).is_ok());
  EXPECT_FALSE(store_->record_enrollment(&h, 10, pending_volume("second"), registered("second")).is_ok());
  EXPECT_EQ(store_->get_volume("second").status().kind(), ErrorKind::kNotFound);
  auto trail = store_->recent_audit(10).value();
  ASSERT_EQ(trail.size(), 2u);  // the token's record, then the enrollment's
  EXPECT_EQ(trail[0].event, "token.create");
  EXPECT_EQ(trail[1].volume_id, "first");
  // By attestation: no token at all.
  EXPECT_TRUE(store_->record_enrollment(nullptr, 10, pending_volume("attested"), registered("attested")).is_ok());
  EXPECT_EQ(store_->get_volume("attested")->state, VolumeState::kPending);
}

TEST_P(StoreContract, VolumeLifecycle) {
  VolumeRecord r{"vol-1", VolumeState::kPending, "{}", random_bytes(60), "d", 1, 1};
  ASSERT_TRUE(store_->insert_volume(r).is_ok());
  EXPECT_FALSE(store_->insert_volume(r).is_ok());  // duplicate id
  EXPECT_EQ(store_->get_volume("vol-1")->state, VolumeState::kPending);
  EXPECT_EQ(store_->get_volume("nope").status().kind(), ErrorKind::kNotFound);
  ASSERT_TRUE(
      store_->transition_volume("vol-1", VolumeState::kPending, VolumeState::kActive, 2).is_ok());
  EXPECT_EQ(store_->transition_volume("vol-1", VolumeState::kPending, VolumeState::kActive, 3)
                .kind(),
            ErrorKind::kConflict);
  EXPECT_EQ(store_->transition_volume("zzz", VolumeState::kActive, VolumeState::kRevoked, 3).kind(),
            ErrorKind::kNotFound);
  auto all = store_->list_volumes();
  ASSERT_TRUE(all.is_ok());
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ(all.value()[0].sealed_secret, r.sealed_secret);
}

TEST_P(StoreContract, PolicyUpdateIsACompareAndSwap) {
  VolumeRecord r{"vol-1", VolumeState::kActive, "{\"v\":1}", random_bytes(60), "d", 1, 1};
  ASSERT_TRUE(store_->insert_volume(r).is_ok());
  ASSERT_TRUE(store_->update_volume_policy("vol-1", "{\"v\":1}", "{\"v\":2}", 5).is_ok());
  // A second writer that read the old policy loses.
  EXPECT_EQ(store_->update_volume_policy("vol-1", "{\"v\":1}", "{\"v\":3}", 6).kind(),
            ErrorKind::kConflict);
  EXPECT_EQ(store_->get_volume("vol-1")->policy_json, "{\"v\":2}");
  EXPECT_EQ(store_->get_volume("vol-1")->updated_at, 5);
  EXPECT_EQ(store_->update_volume_policy("zzz", "{}", "{}", 6).kind(), ErrorKind::kNotFound);
}

TEST_P(StoreContract, ApprovalRequestsChangeByCompareAndSwapWithTheirAuditRecord) {
  const ApprovalRecord pending{"req-a", "vol-1", "i-1", "pending", "{\"n\":0}", 10, 100};
  const AuditEvent asked{10, "approval.request", "pending", "vol-1", "p", "req-a"};
  ASSERT_TRUE(store_->insert_approval(pending, asked).is_ok());
  EXPECT_FALSE(store_->insert_approval(pending, asked).is_ok());  // one id, once
  ASSERT_TRUE(store_->insert_approval({"req-b", "vol-1", "i-2", "pending", "{}", 11, 100}, asked).is_ok());
  EXPECT_EQ(store_->get_approval("req-a")->instance, "i-1");
  EXPECT_EQ(store_->get_approval("req-z").status().kind(), ErrorKind::kNotFound);
  EXPECT_EQ(store_->find_pending_approval("vol-1", "i-2").value()->id, "req-b");
  EXPECT_FALSE(store_->find_pending_approval("vol-2", "i-1").value().has_value());
  // Two approvers reading the same request: the second one's write loses.
  ApprovalRecord approved = pending;
  approved.state = "approved";
  approved.record = "{\"n\":1}";
  ASSERT_TRUE(store_->update_approval(pending, approved, AuditEvent{12, "approval.approve", "approved", "vol-1", "p", "bob"}).is_ok());
  ApprovalRecord other = pending;
  other.record = "{\"n\":2}";
  EXPECT_EQ(store_->update_approval(pending, other, AuditEvent{12, "approval.approve", "ok", "vol-1", "p", "carol"}).kind(),
            ErrorKind::kConflict);
  EXPECT_EQ(store_->get_approval("req-a")->state, "approved");
  EXPECT_FALSE(store_->find_pending_approval("vol-1", "i-1").value().has_value());
  EXPECT_EQ(store_->list_approvals(true, 10)->size(), 1u);
  EXPECT_EQ(store_->list_approvals(false, 10)->size(), 2u);
  EXPECT_EQ(store_->list_approvals(false, 1)->size(), 1u);
  // What was refused left no record; what was done left one each.
  auto trail = store_->recent_audit(100).value();
  ASSERT_EQ(trail.size(), 3u);
  EXPECT_EQ(trail.back().detail, "bob");
}

TEST_P(StoreContract, ACountedReleaseIsRecordedOnlyUnderItsLimit) {
  auto at = [](int64_t now) { return CountedRelease{"vol-1", "i-1", now, now - 100, 2}; };
  const AuditEvent released{0, "unlock", "released", "vol-1", "p", "i-1"};
  ASSERT_TRUE(store_->record_counted_release(at(10), released).is_ok());
  ASSERT_TRUE(store_->record_counted_release(at(20), released).is_ok());
  EXPECT_EQ(store_->record_counted_release(at(30), released).kind(), ErrorKind::kRefused);
  EXPECT_EQ(store_->recent_audit(100)->size(), 2u);  // the refused one left no record
  // Another instance, or another volume, counts on its own.
  EXPECT_TRUE(store_->record_counted_release(CountedRelease{"vol-1", "i-2", 30, -70, 2}, released).is_ok());
  EXPECT_TRUE(store_->record_counted_release(CountedRelease{"vol-2", "i-1", 30, -70, 2}, released).is_ok());
  // Once the first has left the period, one more.
  EXPECT_TRUE(store_->record_counted_release(at(111), released).is_ok());
  EXPECT_EQ(store_->record_counted_release(at(112), released).kind(), ErrorKind::kRefused);
  // An approval spent with a count at its limit: refused, the approval unchanged.
  const ApprovalRecord approved{"req-a", "vol-1", "i-1", "approved", "{}", 100, 1000};
  ASSERT_TRUE(store_->insert_approval(approved, released).is_ok());
  ApprovalRecord used = approved;
  used.state = "used";
  const CountedRelease full = at(113);
  EXPECT_EQ(store_->update_approval(approved, used, released, &full).kind(), ErrorKind::kRefused);
  EXPECT_EQ(store_->get_approval("req-a")->state, "approved");
  const CountedRelease later = at(300);
  EXPECT_TRUE(store_->update_approval(approved, used, released, &later).is_ok());
  EXPECT_EQ(store_->get_approval("req-a")->state, "used");
}

TEST_P(StoreContract, AdminCertificatesAreRecordedOnceAndRevokedOnce) {
  const AdminCertRecord alice{"4a", "alice", "admin", "bootstrap", 10, 1000, 0};
  const AuditEvent issued{10, "admin.cert.issue", "ok", "", "local", "alice"};
  ASSERT_TRUE(store_->insert_admin_cert(alice, issued).is_ok());
  EXPECT_FALSE(store_->insert_admin_cert(alice, issued).is_ok());
  EXPECT_EQ(store_->get_admin_cert("4a")->name, "alice");
  EXPECT_EQ(store_->get_admin_cert("4b").status().kind(), ErrorKind::kNotFound);
  ASSERT_TRUE(store_->revoke_admin_cert("4a", 20, AuditEvent{20, "admin.cert.revoke", "ok", "", "p", "4a"}).is_ok());
  EXPECT_EQ(store_->get_admin_cert("4a")->revoked_at, 20);
  EXPECT_EQ(store_->revoke_admin_cert("4a", 21, issued).kind(), ErrorKind::kConflict);
  EXPECT_EQ(store_->revoke_admin_cert("4b", 21, issued).kind(), ErrorKind::kNotFound);
  EXPECT_EQ(store_->list_admin_certs()->size(), 1u);
  EXPECT_EQ(store_->recent_audit(100)->size(), 2u);
}

TEST_P(StoreContract, AuditKeepsOrder) {
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(store_->append_audit(AuditEvent{i, "unlock", "refused", "v", "p", std::to_string(i)})
                    .is_ok());
  }
  auto last = store_->recent_audit(2);
  ASSERT_TRUE(last.is_ok());
  ASSERT_EQ(last->size(), 2u);
  EXPECT_EQ(last.value()[0].detail, "3");
  EXPECT_EQ(last.value()[1].detail, "4");
}

// Group commit: appends from many threads at once are all durable, each
// thread's in its order, and none is lost or doubled.
TEST_P(StoreContract, ConcurrentAuditAppendsAreAllKeptInOrder) {
  constexpr int kThreads = 16, kEach = 50;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        AuditEvent e{i, "unlock", "released", "v" + std::to_string(t), "p", std::to_string(i)};
        if (!store_->append_audit(e).is_ok()) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  auto all = store_->recent_audit(kThreads * kEach + 10);
  ASSERT_TRUE(all.is_ok());
  ASSERT_EQ(all->size(), static_cast<size_t>(kThreads * kEach));
  std::map<std::string, int> next;
  for (const auto& e : all.value()) {
    EXPECT_EQ(e.detail, std::to_string(next[e.volume_id]++)) << e.volume_id;
  }
  EXPECT_EQ(next.size(), static_cast<size_t>(kThreads));
}

// The trail as read back, verified as `audit verify` does it.
Status verify_trail(Store& store, int64_t* count = nullptr) {
  AuditChainVerifier v;
  int64_t after = 0;
  for (;;) {
    auto page = store.read_audit(after, 7);  // a small page: paging is tested too
    if (!page.is_ok()) return page.status();
    for (const AuditRecord& r : page.value()) {
      KEYGATE_RETURN_IF_ERROR(v.add(r));
      after = r.seq;
    }
    if (page->size() < 7) break;
  }
  if (count != nullptr) *count = v.count();
  return v.finish();
}

// Every write that puts an event on the trail chains it: enrollments,
// expiries and appends from many threads at once (group commit), in one
// unbroken chain numbered from 1.
TEST_P(StoreContract, EveryAuditedWriteIsChained) {
  Bytes h = sha256("token");
  ASSERT_TRUE(store_->create_enrollment_token(h, "{}", 100, 5, token_created()).is_ok());
  ASSERT_TRUE(store_->record_enrollment(&h, 10, pending_volume("a"), registered("a")).is_ok());
  ASSERT_FALSE(store_->record_enrollment(&h, 10, pending_volume("a"), registered("a")).is_ok());  // rolled back
  ASSERT_TRUE(store_->expire_pending(5, 20, AuditEvent{20, "enroll.expire", "ok", "", "local", ""}).is_ok());
  ASSERT_TRUE(store_->expire_pending(50, 20, AuditEvent{20, "enroll.expire", "ok", "", "local", ""}).is_ok());
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 25; ++i) {
        (void)store_->append_audit(AuditEvent{i, "unlock", "released", "v" + std::to_string(t), "p", "\xff"});
      }
    });
  }
  for (auto& th : threads) th.join();
  int64_t count = 0;
  Status s = verify_trail(*store_, &count);
  EXPECT_TRUE(s.is_ok()) << s.message();
  EXPECT_EQ(count, 3 + 8 * 25);  // the token, the enrollment, its expiry, the appends
  auto first = store_->read_audit(0, 1);
  ASSERT_EQ(first->size(), 1u);
  EXPECT_EQ(first.value()[0].seq, 1);
  EXPECT_EQ(first.value()[0].prev_hash, audit_genesis_hash());
}

std::string sql(sqlite3* db, const std::string& statement) {
  char* err = nullptr;
  const int rc = sqlite3_exec(db, statement.c_str(), nullptr, nullptr, &err);
  std::string msg = rc == SQLITE_OK ? "" : (err ? err : "error");
  sqlite3_free(err);
  return msg;
}

std::string StoreContract::raw_sql(const std::string& sqlite_sql, const std::string& pg_sql) {
  if (GetParam() == "postgres") return testing::PgCluster::exec(conninfo_, pg_sql);
  sqlite3* db = nullptr;
  if (sqlite3_open((dir_ + "/keygate.db").c_str(), &db) != SQLITE_OK)
    return "cannot open the SQLite store";
  std::string err = sql(db, sqlite_sql);
  sqlite3_close(db);
  return err;
}

std::string StoreContract::fail_audit_writes(bool failing) {
  if (GetParam() == "memory") {
    static_cast<MemoryStore*>(store_.get())
        ->fail(MemoryStore::Op::kAppendAudit, failing ? Status::error(ErrorKind::kIo, "disk full") : Status::ok());
    return "";
  }
  if (!failing) return raw_sql("DROP TRIGGER full_disk", "DROP TRIGGER full_disk ON audit");
  return raw_sql("CREATE TRIGGER full_disk BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END",
                 "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION "
                 "'disk full'; END$$; "
                 "CREATE TRIGGER full_disk BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION disk_full()");
}

// Records cut from the end of the trail leave no break by themselves; the
// next record written shows the gap, because its number comes from the
// highest ever given, not from what is left.
TEST_P(DurableStoreContract, ATrailCutBackShowsAGapOnceTheNextRecordIsWritten) {
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(store_->append_audit(AuditEvent{i, "unlock", "released", "v", "p", ""}).is_ok());
  EXPECT_EQ(raw_sql("DELETE FROM audit WHERE seq > 3", "DELETE FROM audit WHERE seq > 3"), "");
  EXPECT_TRUE(verify_trail(*store_).is_ok());
  ASSERT_TRUE(store_->append_audit(AuditEvent{9, "unlock", "released", "v", "p", ""}).is_ok());
  const Status s = verify_trail(*store_);
  EXPECT_TRUE(s.message().find("record 6 (") != std::string::npos) << s.message();
  EXPECT_TRUE(s.message().find("records 4 to 5 are missing") != std::string::npos) << s.message();
}

// The SQLite file carries its schema's version: a new one is made at this
// server's, and one of a newer server is refused, unchanged.
TEST_F(StoreTest, TheSqliteSchemaIsVersionedAndANewerOneIsRefused) {
  store_.reset();
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((dir_ + "/keygate.db").c_str(), &db), SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &st, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int64(st, 0), 1);
  sqlite3_finalize(st);
  ASSERT_EQ(sql(db, "PRAGMA user_version = 5"), "");
  sqlite3_close(db);
  auto newer = open_sqlite_store(dir_ + "/keygate.db");
  ASSERT_FALSE(newer.is_ok());
  EXPECT_EQ(newer.status().kind(), ErrorKind::kInvalidArgument);
  EXPECT_NE(newer.status().message().find(
                "schema is version 5, newer than this keygate-server knows (1)"),
            std::string::npos)
      << newer.status().message();
}

// A store written before the chain existed: opened by this version, its
// records are chained as found, in order, with one record saying so; its
// next writes follow on; opening it again changes nothing.
TEST_F(StoreTest, ATrailFromBeforeTheChainIsChainedOnOpen) {
  store_.reset();
  const std::string path = dir_ + "/old.db";
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  EXPECT_EQ(sql(db,
                "CREATE TABLE audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, time INTEGER NOT NULL, "
                "event TEXT NOT NULL, outcome TEXT NOT NULL, volume_id TEXT NOT NULL, peer TEXT NOT NULL, "
                "detail TEXT NOT NULL);"
                "INSERT INTO audit(time, event, outcome, volume_id, peer, detail) VALUES"
                "(1, 'token.create', 'ok', '', 'local', 'aws'),"
                "(2, 'enroll.register', 'ok', 'vol-1', '127.0.0.1', 'by token'),"
                "(3, 'unlock', 'released', 'vol-1', '127.0.0.1', CAST(x'6e6f7420ff' AS TEXT));"),
            "");
  sqlite3_close(db);
  for (int open = 0; open < 2; ++open) {
    auto reopened = open_sqlite_store(path);
    ASSERT_TRUE(reopened.is_ok()) << reopened.status().message();
    int64_t count = 0;
    Status s = verify_trail(*reopened.value(), &count);
    EXPECT_TRUE(s.is_ok()) << s.message();
    EXPECT_EQ(count, 4 + open);
    auto trail = reopened.value()->read_audit(0, 10).value();
    ASSERT_GE(trail.size(), 4u);
    EXPECT_EQ(trail[2].event.event, "unlock");
    EXPECT_EQ(trail[2].event.detail, "not \xef\xbf\xbd");  // made UTF-8, as hashed
    EXPECT_EQ(trail[3].event.event, "audit.chain");
    EXPECT_TRUE(trail[3].event.detail.find("the 3 records before") != std::string::npos) << trail[3].event.detail;
    ASSERT_TRUE(reopened.value()->append_audit(AuditEvent{9, "unlock", "released", "vol-1", "p", ""}).is_ok());
  }
}

TEST_F(StoreTest, SealedSecretIsBoundToKekAndVolume) {
  auto kek = SecretBuffer::random(32).value();
  auto secret = SecretBuffer::random(32).value();
  auto sealed = seal_volume_secret(kek, secret, "vol-a");
  ASSERT_TRUE(sealed.is_ok());
  auto opened = open_volume_secret(kek, sealed.value(), "vol-a");
  ASSERT_TRUE(opened.is_ok());
  EXPECT_TRUE(opened->equals(secret));
  // Moved to another volume's row, or read with another KEK: refused.
  EXPECT_FALSE(open_volume_secret(kek, sealed.value(), "vol-b").is_ok());
  auto other = SecretBuffer::random(32).value();
  EXPECT_FALSE(open_volume_secret(other, sealed.value(), "vol-a").is_ok());
}

TEST_F(StoreTest, KekIsCreatedPrivateAndReloaded) {
  const std::string path = dir_ + "/kek";
  auto first = load_or_create_kek(path);
  ASSERT_TRUE(first.is_ok()) << first.status().message();
  struct stat st;
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto second = load_or_create_kek(path);
  ASSERT_TRUE(second.is_ok());
  EXPECT_TRUE(first->equals(second.value()));
  chmod(path.c_str(), 0644);
  EXPECT_FALSE(load_or_create_kek(path).is_ok());
}

TEST_F(StoreTest, TlsMaterialIsGeneratedOnceWithPrivateKeys) {
  ASSERT_TRUE(ensure_tls_material(dir_, {"DNS:localhost", "IP:127.0.0.1"}).is_ok());
  struct stat st;
  for (const char* key : {"/ca.key", "/server.key"}) {
    ASSERT_EQ(stat((dir_ + key).c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u) << key;
  }
  auto ca1 = read_small_file(dir_ + "/ca.pem", 65536).value();
  ASSERT_TRUE(ensure_tls_material(dir_, {"DNS:localhost"}).is_ok());
  EXPECT_EQ(read_small_file(dir_ + "/ca.pem", 65536).value(), ca1);
  ASSERT_EQ(mkdir((dir_ + "/fresh").c_str(), 0700), 0);
  EXPECT_FALSE(ensure_tls_material(dir_ + "/fresh", {"BOGUS:x"}).is_ok());
  EXPECT_NE(access((dir_ + "/fresh/server.key").c_str(), F_OK), 0);
}

// A revocation and its record are one transaction: a volume is never revoked
// without its record on the trail, nor recorded as revoked while it is not.
TEST_P(StoreContract, ARevocationAndItsRecordAreWrittenTogether) {
  VolumeRecord r{"vol-r", VolumeState::kActive, "{}", random_bytes(60), "", 1, 1};
  ASSERT_TRUE(store_->insert_volume(r).is_ok());
  const AuditEvent event{5, "revoke", "ok", "vol-r", "local", "by alice"};
  EXPECT_EQ(store_->revoke_volume("vol-r", VolumeState::kPending, 5, event).kind(),
            ErrorKind::kConflict);
  EXPECT_EQ(store_->revoke_volume("zzz", VolumeState::kActive, 5, event).kind(),
            ErrorKind::kNotFound);
  EXPECT_TRUE(store_->recent_audit(10)->empty());  // refused: nothing recorded

  // The trail cannot be written: the volume stays as it was.
  ASSERT_EQ(fail_audit_writes(true), "");
  EXPECT_FALSE(store_->revoke_volume("vol-r", VolumeState::kActive, 5, event).is_ok());
  EXPECT_EQ(store_->get_volume("vol-r")->state, VolumeState::kActive);
  ASSERT_EQ(fail_audit_writes(false), "");

  ASSERT_TRUE(store_->revoke_volume("vol-r", VolumeState::kActive, 5, event).is_ok());
  EXPECT_EQ(store_->get_volume("vol-r")->state, VolumeState::kRevoked);
  auto trail = store_->recent_audit(10).value();
  ASSERT_EQ(trail.size(), 1u);
  EXPECT_EQ(trail[0].event, "revoke");
  EXPECT_EQ(trail[0].volume_id, "vol-r");
}

// A client's garbage reaching the trail (bytes that are not UTF-8, NUL) is
// recorded and chained all the same: a refusal is never left off the trail
// because of what the refused client sent.
TEST_P(StoreContract, AuditTextThatIsNotUtf8IsRecordedAndChained) {
  const std::string garbage("\xff\xfe\0\x1b[2Jvol", 10);
  ASSERT_TRUE(
      store_->append_audit(AuditEvent{1, "unlock", "refused", garbage, garbage, garbage}).is_ok());
  VolumeRecord r{"v", VolumeState::kActive, "{}", random_bytes(60), "", 1, 1};
  ASSERT_TRUE(store_->insert_volume(r).is_ok());
  ASSERT_TRUE(store_
                  ->revoke_volume("v", VolumeState::kActive, 2,
                                  AuditEvent{2, "revoke", "ok", "v", "p", garbage})
                  .is_ok());
  int64_t count = 0;
  const Status v = verify_trail(*store_, &count);
  EXPECT_TRUE(v.is_ok()) << v.message();
  EXPECT_EQ(count, 2);
  auto trail = store_->recent_audit(10).value();
  ASSERT_EQ(trail.size(), 2u);
  EXPECT_NE(trail[0].detail.find("vol"), std::string::npos);
}

// PostgreSQL's own: replicas on one database, its schema, its outages.
class PgStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(testing::PgCluster::shared().error(), "");
    conninfo_ = testing::PgCluster::shared().create_database();
    ASSERT_NE(conninfo_, "");
  }
  std::unique_ptr<Store> open() {
    auto s = open_postgres_store(conninfo_);
    EXPECT_TRUE(s.is_ok()) << s.status().message();
    return s.is_ok() ? std::move(s).value() : nullptr;
  }
  std::string conninfo_;
};

TEST_F(PgStoreTest, TheSchemaIsMigratedOnceAndANewerOneIsRefused) {
  ASSERT_NE(open(), nullptr);
  EXPECT_EQ(testing::PgCluster::query(conninfo_, "SELECT version FROM keygate_schema"), "1");
  ASSERT_NE(open(), nullptr);  // again: nothing to do
  EXPECT_EQ(testing::PgCluster::query(conninfo_, "SELECT count(*) FROM keygate_schema"), "1");
  ASSERT_EQ(testing::PgCluster::exec(conninfo_, "UPDATE keygate_schema SET version = 7"), "");
  auto newer = open_postgres_store(conninfo_);
  ASSERT_FALSE(newer.is_ok());
  EXPECT_EQ(newer.status().kind(), ErrorKind::kInvalidArgument);
  EXPECT_NE(newer.status().message().find(
                "schema is version 7, newer than this keygate-server knows (1)"),
            std::string::npos)
      << newer.status().message();
}

// Replicas started together on a new database: one migrates (the advisory
// lock), the others find it done; none fails.
TEST_F(PgStoreTest, ReplicasStartingTogetherAllComeUpOnOneSchema) {
  for (int round = 0; round < 8; ++round) {
    const std::string db = testing::PgCluster::shared().create_database();
    ASSERT_NE(db, "");
    std::vector<std::thread> replicas;
    std::atomic<int> up{0};
    std::string failure;
    std::mutex mu;
    for (int i = 0; i < 4; ++i) {
      replicas.emplace_back([&] {
        auto s = open_postgres_store(db);
        if (s.is_ok()) {
          ++up;
        } else {
          std::lock_guard<std::mutex> lock(mu);
          failure = s.status().message();
        }
      });
    }
    for (auto& t : replicas) t.join();
    EXPECT_EQ(up.load(), 4) << failure;
    EXPECT_EQ(
        testing::PgCluster::query(db, "SELECT string_agg(version::text, ',') FROM keygate_schema"),
        "1");
  }
}

// A nonce one replica issued is accepted once by whichever replica sees it
// first, also when two answer at the same moment.
TEST_F(PgStoreTest, ANonceIssuedByOneReplicaIsConsumedOnceByAny) {
  auto a = open();
  auto b = open();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  Bytes n = random_bytes(32);
  ASSERT_TRUE(a->put_nonce(n, 10, 100).is_ok());
  EXPECT_TRUE(b->consume_nonce(n, 20).value());
  EXPECT_FALSE(a->consume_nonce(n, 20).value());
  EXPECT_FALSE(b->consume_nonce(n, 20).value());
  for (int round = 0; round < 200; ++round) {
    Bytes m = random_bytes(32);
    ASSERT_TRUE((round % 2 ? a : b)->put_nonce(m, 10, 100).is_ok());
    std::atomic<int> accepted{0};
    std::atomic<bool> go{false};
    auto answer = [&](Store* s) {
      while (!go) std::this_thread::yield();
      auto r = s->consume_nonce(m, 20);
      if (r.is_ok() && r.value()) ++accepted;
    };
    std::thread ta(answer, a.get()), tb(answer, b.get());
    go = true;
    ta.join();
    tb.join();
    ASSERT_EQ(accepted.load(), 1) << "round " << round;
  }
}

// Two replicas appending at once (group commits, revocations, counted
// releases) write one chain: every record, numbered without a gap, verifies.
TEST_F(PgStoreTest, ReplicasWritingAtOnceKeepOneUnbrokenChain) {
  auto a = open();
  auto b = open();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  constexpr int kThreads = 4, kEach = 40;
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_TRUE(a->insert_volume(VolumeRecord{"v" + std::to_string(t), VolumeState::kActive, "{}",
                                              random_bytes(60), "", 1, 1})
                    .is_ok());
  }
  std::vector<std::thread> threads;
  std::atomic<int> failed{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Store* s = t % 2 ? a.get() : b.get();
      const std::string vol = "v" + std::to_string(t);
      for (int i = 0; i < kEach; ++i) {
        const AuditEvent e{i, "unlock", "released", vol, "p", std::to_string(i)};
        const Status st = i % 5 == 4
                              ? s->record_counted_release(CountedRelease{vol, "i", i, 0, 1000}, e)
                              : s->append_audit(e);
        if (!st.is_ok()) ++failed;
      }
      if (!s->revoke_volume(vol, VolumeState::kActive, 99,
                            AuditEvent{99, "revoke", "ok", vol, "p", ""})
               .is_ok()) {
        ++failed;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failed.load(), 0);
  int64_t count = 0;
  const Status v = verify_trail(*a, &count);
  EXPECT_TRUE(v.is_ok()) << v.message();
  EXPECT_EQ(count, kThreads * (kEach + 1));
}

// max_releases counted by two replicas at once: never more than the max.
TEST_F(PgStoreTest, ReplicasCountingOneInstancesReleasesNeverPassItsMax) {
  auto a = open();
  auto b = open();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  for (int round = 0; round < 5; ++round) {
    const std::string vol = "vol-" + std::to_string(round);
    std::atomic<int> released{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
      threads.emplace_back([&, t] {
        Store* s = t % 2 ? a.get() : b.get();
        for (int i = 0; i < 3; ++i) {
          if (s->record_counted_release(CountedRelease{vol, "i-1", 50, 0, 5},
                                        AuditEvent{50, "unlock", "released", vol, "p", ""})
                  .is_ok()) {
            ++released;
          }
        }
      });
    }
    for (auto& t : threads) t.join();
    EXPECT_EQ(released.load(), 5) << vol;
  }
}

// Rate-limit buckets live in the database: two replicas count one client
// together, also when they race, and a burst is told once.
TEST_F(PgStoreTest, ReplicasShareRateLimitBuckets) {
  auto a = open();
  auto b = open();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(a->shares_rate_limits());
  // Burst 3, refilled at one token in 1000 s: nothing comes back during the test.
  for (int i = 0; i < 3; ++i)
    EXPECT_TRUE((i % 2 ? a : b)->take_rate_token("address 10.0.0.1", 0.001, 3)->allowed);
  RateTake first = a->take_rate_token("address 10.0.0.1", 0.001, 3).value();
  EXPECT_FALSE(first.allowed);
  EXPECT_TRUE(first.burst_start);
  EXPECT_GT(first.retry_after_ms, 900 * 1000);
  RateTake second = b->take_rate_token("address 10.0.0.1", 0.001, 3).value();
  EXPECT_FALSE(second.allowed);
  EXPECT_FALSE(second.burst_start);  // the same burst: told once
  EXPECT_TRUE(
      a->take_rate_token("address 10.0.0.2", 0.001, 3)->allowed);  // another key counts apart

  std::atomic<int> allowed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      Store* s = t % 2 ? a.get() : b.get();
      for (int i = 0; i < 5; ++i) {
        auto r = s->take_rate_token("instance aws:i-race", 0.001, 10);
        if (r.is_ok() && r->allowed) ++allowed;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(allowed.load(), 10);
}

TEST_F(PgStoreTest, APasswordInTheConnectionStringIsRefusedWithoutQuotingIt) {
  for (const std::string bad :
       {"host=/tmp dbname=k password=hunter2secret", "postgresql://keygate:hunter2secret@/k"}) {
    auto s = open_postgres_store(bad);
    ASSERT_FALSE(s.is_ok()) << bad;
    EXPECT_EQ(s.status().kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(s.status().message().find("password file"), std::string::npos)
        << s.status().message();
    EXPECT_EQ(s.status().message().find("hunter2"), std::string::npos) << s.status().message();
  }
  auto garbage = open_postgres_store("host=/tmp dbname='unterminated hunter2secret");
  ASSERT_FALSE(garbage.is_ok());
  EXPECT_EQ(garbage.status().kind(), ErrorKind::kInvalidArgument);
  EXPECT_EQ(garbage.status().message().find("hunter2"), std::string::npos)
      << garbage.status().message();
}

// While the database is down every call fails as "unavailable" (retry),
// nothing is written half; once it is back the same store serves again.
TEST_F(PgStoreTest, WhileTheDatabaseIsDownCallsFailRetryablyAndServeAgainAfter) {
  auto own = testing::PgCluster::start_own();
  ASSERT_EQ(own->error(), "");
  const std::string db = own->create_database();
  ASSERT_NE(db, "");
  auto opened = open_postgres_store(db);
  ASSERT_TRUE(opened.is_ok()) << opened.status().message();
  std::unique_ptr<Store> store = std::move(opened).value();
  ASSERT_TRUE(
      store
          ->insert_volume(VolumeRecord{"v", VolumeState::kActive, "{}", random_bytes(60), "", 1, 1})
          .is_ok());
  ASSERT_TRUE(store->append_audit(AuditEvent{1, "unlock", "released", "v", "p", ""}).is_ok());

  ASSERT_EQ(own->stop(), "");
  EXPECT_EQ(store->get_volume("v").status().kind(), ErrorKind::kUnavailable);
  EXPECT_EQ(store->append_audit(AuditEvent{2, "unlock", "released", "v", "p", ""}).kind(),
            ErrorKind::kUnavailable);
  EXPECT_EQ(store->put_nonce(random_bytes(32), 1, 100).kind(), ErrorKind::kUnavailable);
  EXPECT_EQ(
      store
          ->revoke_volume("v", VolumeState::kActive, 3, AuditEvent{3, "revoke", "ok", "v", "p", ""})
          .kind(),
      ErrorKind::kUnavailable);

  ASSERT_EQ(own->start(), "");
  EXPECT_EQ(store->get_volume("v")->state, VolumeState::kActive);
  ASSERT_TRUE(store->append_audit(AuditEvent{4, "unlock", "released", "v", "p", ""}).is_ok());
  int64_t count = 0;
  EXPECT_TRUE(verify_trail(*store, &count).is_ok());
  EXPECT_EQ(count, 2);  // the one before and the one after; nothing from the outage
}

}  // namespace
}  // namespace keygate::server
