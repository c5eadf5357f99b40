// Several keygate-server replicas on one PostgreSQL database, and a
// database that goes away: real servers over real TLS, the real unlocker,
// a real PostgreSQL cluster (tests/pg_cluster.h). Whatever the run's
// KEYGATE_TEST_STORE, these servers use PostgreSQL.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>

#include "core/envelope.h"
#include "server/audit_chain.h"
#include "tests/keygate_fixture.h"
#include "tests/pg_cluster.h"

namespace keygate::testing {
namespace {

size_t count_of(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

class ReplicaTest : public KeygateTest {
 protected:
  // A state folder naming the PostgreSQL database `conninfo`.
  static std::string state_on(const std::string& conninfo, const std::string& name) {
    const std::string state = dir_ + "/" + unique(name);
    EXPECT_EQ(mkdir(state.c_str(), 0700), 0);
    write_file(state + "/store.conf", conninfo + "\n");
    return state;
  }

  // Two replicas on one new database. They share the KEK, the TLS
  // certificate and the admin CA as replicas must (by configuration: the
  // second's state folder is a copy of the first's). One instance unlocks
  // here many times a second: the per-instance limit (counted by both
  // together) is raised unless `per_instance` says otherwise.
  void start_replicas(const std::string& per_instance = R"({"per_second": 1000, "burst": 1000})",
                      std::vector<std::string> a_extra = {},
                      std::vector<std::string> b_extra = {}) {
    const std::string db = PgCluster::shared().create_database();
    ASSERT_NE(db, "");
    db_ = db;
    const std::string config = dir_ + "/" + unique("replica-config") + ".json";
    write_file(config, R"({"rate_limits": {"per_instance": )" + per_instance + "}}");
    a_extra.insert(a_extra.begin(), {"--config", config});
    b_extra.insert(b_extra.begin(), {"--config", config});
    a_ = start_server("a", a_extra, state_on(db, "replica-a"));
    ASSERT_GT(a_.port, 0) << read_file(a_.process.log_path());
    const std::string b_state = dir_ + "/" + unique("replica-b");
    ASSERT_EQ(run({"cp", "-a", a_.state, b_state}).exit_code, 0);
    b_ = start_server("b", b_extra, b_state);
    ASSERT_GT(b_.port, 0) << read_file(b_.process.log_path());
  }

  // A volume enrolled through the first replica, its token listing the
  // second first (its unlocker goes there): (path, id), the id empty if
  // enrollment failed.
  std::pair<std::string, std::string> enrolled_second_first() {
    const std::string vol = new_volume_file();
    RunResult enrolled = enroll_format(vol, a_, make_token(a_), emulator_, {b_.url()});
    EXPECT_EQ(enrolled.exit_code, 0) << enrolled.err;
    std::smatch m;
    EXPECT_TRUE(std::regex_search(enrolled.out, m, std::regex("enrolled as volume ([0-9a-f-]+)")))
        << enrolled.out;
    return {vol, m.size() > 1 ? m[1].str() : ""};
  }

  // An unlock request for `volume_id` answering `nonce`.
  std::string unlock_request(const std::string& volume_id, const Bytes& nonce) {
    auto keys = X25519KeyPair::generate().value();
    Json::Value req;
    req["volume_id"] = volume_id;
    req["nonce"] = base64_encode(nonce);
    req["client_public_key"] = base64_encode(keys.public_key.data(), keys.public_key.size());
    req["evidence"] = evidence_;
    return to_json(req);
  }
  int post_unlock(const Server& s, const std::string& body) {
    auto res = api_client(s)->Post(api::kUnlockPath, body, "application/json");
    return res ? res->status : -1;
  }

  void TearDown() override {
    a_.process.stop();
    b_.process.stop();
    KeygateTest::TearDown();
  }

  Server a_, b_;
  std::string db_;  // the replicas' database (its connection string)
  Json::Value evidence_;
};

// Any replica serves any request: a nonce one issued is accepted once by
// the other, also when both are asked at the same moment; a revocation
// made through one holds at the other; both write one chain.
TEST_F(ReplicaTest, TwoReplicasOnOneDatabaseShareNoncesRevocationsAndOneChain) {
  ASSERT_EQ(PgCluster::shared().error(), "");
  start_replicas();
  // Enrolled through the first replica; the volume's token lists the second
  // first.
  const auto [vol, id] = enrolled_second_first();
  ASSERT_FALSE(id.empty());
  evidence_ = aws_evidence(emulator_);

  const std::string req = unlock_request(id, fresh_nonce(a_));
  EXPECT_EQ(post_unlock(b_, req), 200);
  EXPECT_EQ(post_unlock(b_, req), 403);
  EXPECT_EQ(post_unlock(a_, req), 403);
  int released = 1;

  // The same answer sent to both replicas at once: one release, many rounds.
  for (int round = 0; round < 25; ++round) {
    const std::string same = unlock_request(id, fresh_nonce(round % 2 ? a_ : b_));
    std::atomic<bool> go{false};
    int at_a = 0, at_b = 0;
    std::thread ta([&] {
      while (!go) std::this_thread::yield();
      at_a = post_unlock(a_, same);
    });
    std::thread tb([&] {
      while (!go) std::this_thread::yield();
      at_b = post_unlock(b_, same);
    });
    go = true;
    ta.join();
    tb.join();
    ASSERT_TRUE((at_a == 200 && at_b == 403) || (at_a == 403 && at_b == 200))
        << "round " << round << ": " << at_a << " and " << at_b;
    ++released;
  }

  // The real unlocker, with the second replica first in its list: the
  // volume opens through it.
  RunResult opened = unlock(vol, emulator_);
  EXPECT_EQ(opened.exit_code, 0) << opened.err;
  EXPECT_TRUE(contains(opened.err, "key released by " + b_.url())) << opened.err;
  ++released;

  // Revoked through the first replica's host command: the second refuses.
  ASSERT_EQ(
      run({bin("keygate-server"), "volumes", "revoke", id, "--state-dir", a_.state}).exit_code, 0);
  EXPECT_EQ(post_unlock(b_, unlock_request(id, fresh_nonce(b_))), 403);
  EXPECT_EQ(post_unlock(a_, unlock_request(id, fresh_nonce(a_))), 403);

  // One chain, written by both, verified from either side, with every
  // release on it.
  for (const Server* s : {&a_, &b_}) {
    RunResult v = run({bin("keygate-server"), "audit", "verify", "--state-dir", s->state});
    EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  }
  EXPECT_EQ(count_of(audit_text(b_), "unlock released volume=" + id),
            static_cast<size_t>(released));
}

// One instance's rate is counted by the replicas together: its burst spent
// at one, the other answers 429 too.
TEST_F(ReplicaTest, ReplicasCountOneInstancesRateTogether) {
  ASSERT_EQ(PgCluster::shared().error(), "");
  start_replicas(R"({"per_second": 0.01, "burst": 4})");
  auto [vol, id] = enrolled_volume(&a_);  // the registration takes one
  ASSERT_FALSE(id.empty());
  evidence_ = aws_evidence(emulator_);
  EXPECT_EQ(post_unlock(a_, unlock_request(id, fresh_nonce(a_))), 200);
  EXPECT_EQ(post_unlock(b_, unlock_request(id, fresh_nonce(b_))), 200);
  EXPECT_EQ(post_unlock(a_, unlock_request(id, fresh_nonce(a_))), 200);
  EXPECT_EQ(post_unlock(b_, unlock_request(id, fresh_nonce(b_))), 429);
  EXPECT_EQ(post_unlock(a_, unlock_request(id, fresh_nonce(a_))), 429);
  // The burst is on the trail once, not once per replica or request.
  EXPECT_EQ(count_of(audit_text(a_), "rate limit per instance"), 1u) << audit_text(a_);
}

// The policy in force is the newest one any replica loaded, on every
// replica: a load at one changes what the other admits, at its next unlock.
TEST_F(ReplicaTest, ThePolicyLoadedAtOneReplicaIsInForceAtTheOther) {
  ASSERT_EQ(PgCluster::shared().error(), "");
  const Identity id;
  auto policy = [](const std::string& account) {
    return str_cat(R"({"policies": {"p": {"platform": "aws", "require": {"account_id": ")", account,
                   R"("}}}})", "\n");
  };
  const std::string file_a = dir_ + "/" + unique("policy-a") + ".json";
  const std::string file_b = dir_ + "/" + unique("policy-b") + ".json";
  write_file(file_a, policy(id.account));
  write_file(file_b, policy(id.account));
  start_replicas(R"({"per_second": 1000, "burst": 1000})", {"--policy-file", file_a},
                 {"--policy-file", file_b});
  // Same file at both: the second start published nothing new.
  EXPECT_EQ(count_of(audit_text(a_), "policy.load ok"), 1u) << audit_text(a_);
  const std::string vol = new_volume_file();
  RunResult enrolled =
      enroll_format(vol, a_, make_token(a_, {"--policy", "p", "--policy-file", file_a}), emulator_);
  ASSERT_EQ(enrolled.exit_code, 0) << enrolled.err;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(enrolled.out, m, std::regex("enrolled as volume ([0-9a-f-]+)")));
  const std::string vid = m[1].str();
  evidence_ = aws_evidence(emulator_);
  EXPECT_EQ(post_unlock(a_, unlock_request(vid, fresh_nonce(a_))), 200);

  // b loads a policy that admits another account only: a refuses too,
  // though a's own file still admits the instance.
  write_file(file_b, policy("210987654321"));
  ASSERT_EQ(kill(b_.process.pid(), SIGHUP), 0);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (count_of(audit_text(a_), "policy.load ok") < 2 &&
         std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_TRUE(contains(audit_text(a_), "version 2")) << audit_text(a_);
  EXPECT_EQ(post_unlock(a_, unlock_request(vid, fresh_nonce(a_))), 403);
  EXPECT_EQ(post_unlock(b_, unlock_request(vid, fresh_nonce(b_))), 403);
  EXPECT_TRUE(contains(read_file(a_.process.log_path()), "policy version 2"))
      << read_file(a_.process.log_path());

  // a loads its own again (SIGHUP): the newest, in force at both.
  ASSERT_EQ(kill(a_.process.pid(), SIGHUP), 0);
  while (count_of(audit_text(a_), "policy.load ok") < 3 &&
         std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(post_unlock(b_, unlock_request(vid, fresh_nonce(b_))), 200);
  EXPECT_EQ(post_unlock(a_, unlock_request(vid, fresh_nonce(a_))), 200);
}

// Approvals live in the database: an unlock waiting at one replica is
// approved through the other's admin API, and two approvers deciding at
// the two replicas at the same moment make one decision.
TEST_F(ReplicaTest, AnUnlockWaitingAtOneReplicaIsApprovedThroughTheOther) {
  ASSERT_EQ(PgCluster::shared().error(), "");
  const Identity id;
  const std::string file = dir_ + "/" + unique("manual-policy") + ".json";
  write_file(file,
             str_cat(R"({"policies": {"manual": {"platform": "aws", "require": {"account_id": ")",
                     id.account, R"("}, "approval": "manual"}}})", "\n"));
  start_replicas(R"({"per_second": 1000, "burst": 1000})", {"--policy-file", file},
                 {"--policy-file", file});
  const std::string people = dir_ + "/" + unique("people");
  ASSERT_EQ(mkdir(people.c_str(), 0700), 0);
  RunResult boot = run({bin("keygate-server"), "admin", "bootstrap", "--state-dir", a_.state,
                        "--name", "alice", "--out", people + "/alice", "--server-url", a_.url()});
  ASSERT_EQ(boot.exit_code, 0) << boot.err;
  auto admin = [&](const std::string& who, const Server& at, std::vector<std::string> args) {
    std::vector<std::string> argv = {bin("keygate-server"), "admin"};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.insert(argv.end(), {"--admin-dir", people + "/" + who, "--server", at.url()});
    return run(argv);
  };
  for (const std::string who : {"bob", "carol"}) {
    RunResult issued =
        admin("alice", b_,
              {"cert", "issue", "--name", who, "--role", "approver", "--out", people + "/" + who});
    ASSERT_EQ(issued.exit_code, 0) << issued.err;
  }
  const std::string vol = new_volume_file();
  RunResult enrolled =
      enroll_format(vol, a_, make_token(a_, {"--policy", "manual", "--policy-file", file}),
                    emulator_, {b_.url()});
  ASSERT_EQ(enrolled.exit_code, 0) << enrolled.err;

  for (int round = 0; round < 2; ++round) {
    // The unlocker asks the second replica first: it waits there.
    auto waiting = std::async(std::launch::async, [&] {
      return run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url", emulator_.url(),
                  "--timeout", "5", "--deadline", "60"});
    });
    std::string rid;
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (rid.empty() && std::chrono::steady_clock::now() < give_up) {
      RunResult listed = admin("bob", a_, {"requests", "--json"});  // listed at the first
      auto parsed = parse_json_object(listed.out, 1 << 20);
      if (parsed.is_ok() && parsed.value()["requests"].size() == 1) {
        rid = parsed.value()["requests"][0]["request_id"].asString();
      }
      if (rid.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    ASSERT_FALSE(rid.empty()) << read_file(b_.process.log_path());
    if (round == 0) {
      RunResult approved =
          admin("bob", a_, {"approve", rid, "--reason", "CHG-1 at the first replica"});
      EXPECT_EQ(approved.exit_code, 0) << approved.err;
    } else {
      // bob at the first and carol at the second, at once: one decision.
      std::atomic<bool> go{false};
      auto decide = [&](const std::string& who, const Server& at) {
        return std::async(std::launch::async, [&, who] {
          while (!go) std::this_thread::yield();
          return admin(who, at, {"approve", rid, "--reason", "CHG-2 by " + who});
        });
      };
      auto by_bob = decide("bob", a_);
      auto by_carol = decide("carol", b_);
      go = true;
      const int bob = by_bob.get().exit_code, carol = by_carol.get().exit_code;
      EXPECT_TRUE((bob == 0) != (carol == 0)) << "bob " << bob << ", carol " << carol;
    }
    RunResult unlocked = waiting.get();
    EXPECT_EQ(unlocked.exit_code, 0) << unlocked.err;
    EXPECT_TRUE(contains(unlocked.err, "key released by " + b_.url())) << unlocked.err;
  }
  const std::string trail = audit_text(a_);
  EXPECT_EQ(count_of(trail, "approval.approve approved"), 2u) << trail;
  EXPECT_EQ(count_of(trail, "unlock released"), 2u) << trail;
  RunResult v = run({bin("keygate-server"), "audit", "verify", "--state-dir", b_.state});
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
}

// A replica killed in the middle of a run of unlocks and started again
// serves again; no record is lost and the chain still verifies.
TEST_F(ReplicaTest, AReplicaKilledMidRunServesAgainAndNoRecordIsLost) {
  ASSERT_EQ(PgCluster::shared().error(), "");
  start_replicas();
  auto [vol, id] = enrolled_volume(&a_);
  ASSERT_FALSE(id.empty());
  evidence_ = aws_evidence(emulator_);
  int ok = 0;
  for (int i = 0; i < 30; ++i) {
    if (i == 10) {
      ASSERT_EQ(kill(b_.process.pid(), SIGKILL), 0);
      b_.process.stop();
    }
    if (i == 20) {
      const std::string config = dir_ + "/" + unique("replica-config") + ".json";
      write_file(config,
                 R"({"rate_limits": {"per_instance": {"per_second": 1000, "burst": 1000}}})");
      b_ = start_server(
          "b", {"--config", config, "--listen", "127.0.0.1:" + std::to_string(b_.port)}, b_.state);
      ASSERT_GT(b_.port, 0) << read_file(b_.process.log_path());
    }
    const Server& s = i % 2 ? a_ : b_;
    if (i % 2 == 0 && i >= 10 && i < 20) continue;  // b is down
    const int status = post_unlock(s, unlock_request(id, fresh_nonce(s)));
    EXPECT_EQ(status, 200) << "unlock " << i;
    if (status == 200) ++ok;
  }
  EXPECT_EQ(ok, 25);
  RunResult v = run({bin("keygate-server"), "audit", "verify", "--state-dir", b_.state});
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  EXPECT_EQ(count_of(audit_text(a_), "unlock released volume=" + id), static_cast<size_t>(ok));
}

// A replica that stops in the middle of writing the trail (a paused VM, a
// SIGSTOP) holds the trail's head, and with it every other replica's
// releases: PostgreSQL ends its transaction after a bounded idle time
// (keygate's sessions never idle inside one), the other replica answers 503
// meanwhile and the unlocker retries into a release well inside its
// deadline. The stopped replica, once resumed, releases nothing from the
// write it lost, and serves again.
TEST_F(ReplicaTest, AReplicaStoppedHoldingTheTrailsHeadHoldsTheOthersOnlyBriefly) {
  ASSERT_EQ(PgCluster::shared().error(), "");
  start_replicas();
  // The volume lists the second replica first: its unlocker goes there.
  const auto [vol, id] = enrolled_second_first();
  ASSERT_FALSE(id.empty());
  evidence_ = aws_evidence(emulator_);

  // While the flag row is there, advancing the trail's head sleeps 3 s
  // after taking its lock: a window in which to stop the replica that
  // holds it.
  ASSERT_EQ(PgCluster::exec(db_, R"(
      CREATE TABLE test_slow_head (flag boolean);
      CREATE FUNCTION test_slow_head() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF EXISTS (SELECT 1 FROM test_slow_head) THEN PERFORM pg_sleep(3); END IF;
        RETURN NEW; END $$;
      CREATE TRIGGER test_slow_head AFTER UPDATE ON audit_head
        FOR EACH ROW EXECUTE FUNCTION test_slow_head();
      INSERT INTO test_slow_head VALUES (true);)"),
            "");
  const std::string at_a = unlock_request(id, fresh_nonce(a_));
  int a_status = 0;
  std::thread held([&] {
    auto cli = api_client(a_);
    cli->set_read_timeout(120);
    auto res = cli->Post(api::kUnlockPath, at_a, "application/json");
    a_status = res ? res->status : -1;
  });
  // Replica a is inside its audit write, the head's lock taken: stop it.
  std::string sleeping;
  for (int i = 0; i < 100 && sleeping != "1"; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    sleeping = PgCluster::query(
        db_, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'");
  }
  ASSERT_EQ(sleeping, "1");
  ASSERT_EQ(kill(a_.process.pid(), SIGSTOP), 0);
  ASSERT_EQ(PgCluster::exec(db_, "DELETE FROM test_slow_head"), "");
  // Its statement ends; its transaction stays open, idle, the lock held.
  std::string idle;
  for (int i = 0; i < 100 && idle != "1"; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    idle = PgCluster::query(
        db_, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle in transaction'");
  }
  ASSERT_EQ(idle, "1");

  // The other replica keeps answering, and the real unlocker opens the
  // volume through it within a bound well inside its deadline.
  const auto started = std::chrono::steady_clock::now();
  std::future<RunResult> opened = std::async(std::launch::async, [&] {
    return run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url", emulator_.url(),
                "--timeout", "5", "--deadline", "40"});
  });
  std::this_thread::sleep_for(std::chrono::seconds(1));
  auto challenge = api_client(b_)->Post(api::kChallengePath, "{}", "application/json");
  ASSERT_TRUE(challenge);
  EXPECT_EQ(challenge->status, 200) << challenge->body;
  const RunResult r = opened.get();
  const auto took = std::chrono::steady_clock::now() - started;
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "key released by " + b_.url())) << r.err;
  EXPECT_LT(took, std::chrono::seconds(25));

  // Resumed, the stopped replica finds its write gone: its answer is a
  // retryable refusal, never the key; then it serves again.
  ASSERT_EQ(kill(a_.process.pid(), SIGCONT), 0);
  held.join();
  EXPECT_EQ(a_status, 503);
  EXPECT_EQ(post_unlock(a_, unlock_request(id, fresh_nonce(a_))), 200);

  for (const Server* s : {&a_, &b_}) {
    RunResult v = run({bin("keygate-server"), "audit", "verify", "--state-dir", s->state});
    EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  }
  EXPECT_EQ(count_of(audit_text(b_), "unlock released volume=" + id), 2u);
}

// The admin API runs on workers of its own: admin requests stuck on the
// database (listing approval requests while another session holds their
// table), many at once and sent again as each gives up, take no worker an
// unlock needs. The unlock goes through in its usual time.
TEST_F(ReplicaTest, StuckAdminRequestsTakeNoWorkerFromUnlocks) {
  ASSERT_EQ(PgCluster::shared().error(), "");
  start_replicas();
  const std::string people = dir_ + "/" + unique("people");
  ASSERT_EQ(mkdir(people.c_str(), 0700), 0);
  RunResult boot = run({bin("keygate-server"), "admin", "bootstrap", "--state-dir", a_.state,
                        "--name", "alice", "--out", people + "/alice", "--server-url", a_.url()});
  ASSERT_EQ(boot.exit_code, 0) << boot.err;
  auto [vol, id] = enrolled_volume(&a_);
  ASSERT_FALSE(id.empty());
  ASSERT_EQ(unlock(vol, emulator_).exit_code, 0);

  auto holder = std::make_unique<PgSession>(db_, "BEGIN; LOCK TABLE approvals IN ACCESS EXCLUSIVE MODE");
  ASSERT_EQ(holder->error(), "");
  // Four times as many admin requests as the server has workers, each
  // stuck for the database's lock timeout and sent again.
  std::atomic<bool> stop{false};
  std::atomic<int> stuck{0};
  std::vector<std::thread> admins;
  for (int i = 0; i < 32; ++i) {
    admins.emplace_back([&] {
      httplib::SSLClient cli("127.0.0.1", a_.port, people + "/alice/cert.pem",
                             people + "/alice/key.pem");
      cli.set_ca_cert_path(a_.ca().c_str());
      cli.enable_server_certificate_verification(true);
      cli.set_read_timeout(30);
      while (!stop) {
        auto res = cli.Get("/v1/admin/requests");
        if (res && res->status != 200) ++stuck;
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::seconds(1));
  const auto started = std::chrono::steady_clock::now();
  RunResult opened = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url",
                          emulator_.url(), "--timeout", "5", "--deadline", "30"});
  const auto took = std::chrono::steady_clock::now() - started;
  EXPECT_EQ(opened.exit_code, 0) << opened.err;
  EXPECT_LT(took, std::chrono::seconds(4)) << opened.err;
  // The admin requests were indeed stuck: each waited and was refused.
  while (stuck == 0 && std::chrono::steady_clock::now() - started < std::chrono::seconds(10)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  stop = true;
  holder.reset();  // the queued admin requests now finish at once
  for (auto& t : admins) t.join();
  EXPECT_GT(stuck.load(), 0);
}

// PostgreSQL stopped during a run of unlocks: the server answers 503 with
// Retry-After (the unlocker retries), releases nothing without its record,
// and once the database is back the same unlock succeeds within its deadline.
TEST_F(ReplicaTest, WhilePostgresIsDownUnlocksRetryAndNoKeyLeavesWithoutItsRecord) {
  auto own = PgCluster::start_own();
  ASSERT_EQ(own->error(), "");
  const std::string db = own->create_database();
  ASSERT_NE(db, "");
  Server s = start_server("pg-down", {}, state_on(db, "pg-down"));
  ASSERT_GT(s.port, 0) << read_file(s.process.log_path());
  auto [vol, id] = enrolled_volume(&s);
  ASSERT_FALSE(id.empty());
  ASSERT_EQ(unlock(vol, emulator_).exit_code, 0);
  evidence_ = aws_evidence(emulator_);
  const Bytes early_nonce = fresh_nonce(s);  // issued before the outage

  ASSERT_EQ(own->stop(), "");
  auto challenge = api_client(s)->Post(api::kChallengePath, "{}", "application/json");
  ASSERT_TRUE(challenge);
  EXPECT_EQ(challenge->status, 503) << challenge->body;
  EXPECT_EQ(challenge->get_header_value("Retry-After"), "2");
  const int during = post_unlock(s, unlock_request(id, early_nonce));
  EXPECT_EQ(during, 503);

  // A run of real unlockers (three at once, as instances booting together),
  // started while the database is down.
  std::thread back([&] {
    std::this_thread::sleep_for(std::chrono::seconds(4));
    EXPECT_EQ(own->start(), "");
  });
  constexpr int kUnlockers = 3;
  std::vector<RunResult> results(kUnlockers);
  std::vector<std::chrono::steady_clock::duration> took(kUnlockers);
  std::vector<std::thread> unlockers;
  for (int i = 0; i < kUnlockers; ++i) {
    unlockers.emplace_back([&, i] {
      const auto started = std::chrono::steady_clock::now();
      results[i] = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url",
                        emulator_.url(), "--timeout", "5", "--deadline", "60"});
      took[i] = std::chrono::steady_clock::now() - started;
    });
  }
  for (auto& u : unlockers) u.join();
  back.join();
  for (int i = 0; i < kUnlockers; ++i) {
    EXPECT_EQ(results[i].exit_code, 0) << results[i].err;
    EXPECT_TRUE(contains(results[i].out, "opens keyslot")) << results[i].out;
    EXPECT_GE(took[i], std::chrono::seconds(3));  // it did wait for the database
    EXPECT_LT(took[i], std::chrono::seconds(60));
  }

  // Every release has its record, and there are no others; the chain verifies.
  RunResult v = run({bin("keygate-server"), "audit", "verify", "--state-dir", s.state});
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  EXPECT_EQ(count_of(audit_text(s), "unlock released volume=" + id), 1u + kUnlockers);
  EXPECT_TRUE(contains(read_file(s.process.log_path()), "database"))
      << read_file(s.process.log_path());
  s.process.stop();
}

// An SQLite store grown up: migrate-store copies it into PostgreSQL whole
// (active, pending and revoked volumes, the trail as it is), refuses a
// database that is not empty and a trail whose chain is broken, and a
// server on the copy unlocks every active volume.
TEST_F(ReplicaTest, MigrateStoreMovesAnSqliteStoreWholeAndItsVolumesUnlockAfter) {
  ASSERT_EQ(PgCluster::shared().error(), "");
  ASSERT_FALSE(on_postgres());  // this binary's servers start on SQLite
  auto [active, active_id] = enrolled_volume();
  auto [gone, gone_id] = enrolled_volume();
  ASSERT_EQ(run({bin("keygate-server"), "volumes", "revoke", gone_id, "--state-dir", server_.state})
                .exit_code,
            0);
  ASSERT_EQ(unlock(active, emulator_).exit_code, 0);
  ASSERT_EQ(unlock(gone, emulator_).exit_code, kExitRefused);
  server_.process.stop();
  {
    auto store = open_store_of(server_.state);
    ASSERT_NE(store, nullptr);
    server::VolumeRecord pending;
    pending.id = "registered-never-confirmed";
    pending.policy_json = "{}";
    pending.sealed_secret = Bytes(60, 1);
    pending.created_at = pending.updated_at = static_cast<int64_t>(time(nullptr));
    ASSERT_TRUE(store->insert_volume(pending).is_ok());
  }
  RunResult before = run({bin("keygate-server"), "audit", "verify", "--state-dir", server_.state});
  ASSERT_EQ(before.exit_code, 0) << before.err;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(before.out, m,
                                std::regex("intact: (\\d+) records; head (\\d+:[0-9a-f]+)")));
  const std::string records = m[1].str(), head = m[2].str();

  const std::string db = PgCluster::shared().create_database();
  ASSERT_NE(db, "");
  RunResult moved =
      run({bin("keygate-server"), "migrate-store", "--state-dir", server_.state, "--to", db});
  ASSERT_EQ(moved.exit_code, 0) << moved.out << moved.err;
  EXPECT_TRUE(contains(moved.out, "copied 3 volumes (1 active, 1 pending, 1 revoked)"))
      << moved.out;
  EXPECT_TRUE(contains(moved.out, records + " audit records")) << moved.out;
  EXPECT_TRUE(contains(moved.out, "SQLite head " + head)) << moved.out;
  const std::string copied = PgCluster::query(db, "SELECT count(*) FROM audit");
  EXPECT_EQ(copied, std::to_string(std::stoi(records) + 1));

  // Again into the same database: refused, nothing added.
  RunResult again =
      run({bin("keygate-server"), "migrate-store", "--state-dir", server_.state, "--to", db});
  EXPECT_NE(again.exit_code, 0);
  EXPECT_TRUE(contains(again.err, "holds a keygate store already")) << again.err;
  EXPECT_EQ(PgCluster::query(db, "SELECT count(*) FROM audit"), copied);

  // The server on the copy: the SQLite file moved out of the way, so only
  // PostgreSQL can answer.
  ASSERT_EQ(rename((server_.state + "/keygate.db").c_str(),
                   (server_.state + "/keygate.db.migrated").c_str()),
            0);
  write_file(server_.state + "/store.conf", db + "\n");
  server_ = start_server("migrated", {"--listen", "127.0.0.1:" + std::to_string(server_.port)},
                         server_.state);
  ASSERT_GT(server_.port, 0) << read_file(server_.process.log_path());
  RunResult opened = unlock(active, emulator_);
  EXPECT_EQ(opened.exit_code, 0) << opened.err;
  EXPECT_EQ(unlock(gone, emulator_).exit_code, kExitRefused);
  RunResult after =
      run({bin("keygate-server"), "audit", "verify", "--state-dir", server_.state, "--head", head});
  EXPECT_EQ(after.exit_code, 0) << after.out << after.err;
  EXPECT_TRUE(contains(audit_text(server_), "store.migrate ok")) << audit_text(server_);
  EXPECT_TRUE(
      contains(run({bin("keygate-server"), "volumes", "list", "--state-dir", server_.state}).out,
               "registered-never-confirmed"));

  // A trail whose chain is broken is not copied.
  ASSERT_EQ(rename((server_.state + "/keygate.db.migrated").c_str(), (dir_ + "/broken.db").c_str()),
            0);
  const std::string broken = dir_ + "/" + unique("broken-state");
  ASSERT_EQ(mkdir(broken.c_str(), 0700), 0);
  ASSERT_EQ(rename((dir_ + "/broken.db").c_str(), (broken + "/keygate.db").c_str()), 0);
  {
    sqlite3* sdb = nullptr;
    ASSERT_EQ(sqlite3_open((broken + "/keygate.db").c_str(), &sdb), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(sdb, "UPDATE audit SET detail = 'edited' WHERE seq = 2", nullptr,
                           nullptr, nullptr),
              SQLITE_OK);
    sqlite3_close(sdb);
  }
  const std::string fresh = PgCluster::shared().create_database();
  RunResult refused =
      run({bin("keygate-server"), "migrate-store", "--state-dir", broken, "--to", fresh});
  EXPECT_EQ(refused.exit_code, 3) << refused.err;
  EXPECT_TRUE(contains(refused.err, "not copied")) << refused.err;
  EXPECT_EQ(PgCluster::query(fresh, "SELECT count(*) FROM audit"),
            "");  // not even a schema: nothing written
}

// A free TCP port on 127.0.0.1 (bound and released).
int free_loopback_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  close(fd);
  return port;
}

// The database over TLS (sslmode=verify-full against the operator's CA) with
// a password that is only in a password file: the server serves; a
// certificate from another CA, a connection without TLS, or a password in
// the connection string, and it does not start, saying why and never
// printing the password.
TEST_F(ReplicaTest, TheDatabaseOverVerifiedTlsWithItsPasswordInAFile) {
  auto own = PgCluster::start_own();
  ASSERT_EQ(own->error(), "");
  const std::string admin = own->conninfo("postgres");
  ASSERT_EQ(PgCluster::exec(admin, "CREATE ROLE keygate LOGIN PASSWORD 'only-in-the-file-7Q'"), "");
  ASSERT_EQ(PgCluster::exec(admin, "CREATE DATABASE keys OWNER keygate"), "");

  // A CA and the database's certificate for 127.0.0.1, as an operator makes them.
  const std::string pki = dir_ + "/" + unique("db-pki");
  ASSERT_EQ(mkdir(pki.c_str(), 0700), 0);
  auto ssl = [&](const std::string& cmd) {
    RunResult r = run({"sh", "-c", "cd '" + pki + "' && " + cmd + " 2>&1"});
    EXPECT_EQ(r.exit_code, 0) << cmd << "\n" << r.out;
  };
  ssl("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out "
      "ca.pem -days 2 "
      "-subj /CN=db-ca");
  ssl("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout other-ca.key "
      "-out other-ca.pem "
      "-days 2 -subj /CN=other-ca");
  ssl("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key -out "
      "server.csr "
      "-subj /CN=db");
  ssl("printf 'subjectAltName=IP:127.0.0.1\n' > san.ext && openssl x509 -req -in server.csr -CA "
      "ca.pem -CAkey ca.key "
      "-CAcreateserial -out server.crt -days 2 -extfile san.ext");
  const std::string data = own->data_dir();
  ASSERT_EQ(
      run({"install", "-o", "postgres", "-m", "0600", pki + "/server.key", data + "/server.key"})
          .exit_code,
      0);
  ASSERT_EQ(
      run({"install", "-o", "postgres", "-m", "0644", pki + "/server.crt", data + "/server.crt"})
          .exit_code,
      0);
  // Only TLS with a password from 127.0.0.1; the superuser on the socket only.
  write_file(data + "/pg_hba.conf",
             "local all postgres trust\nhostssl keys keygate 127.0.0.1/32 scram-sha-256\n");
  const int port = free_loopback_port();
  ASSERT_GT(port, 0);
  ASSERT_EQ(own->stop(), "");
  ASSERT_EQ(own->start("-c listen_addresses=127.0.0.1 -p " + std::to_string(port) + " -c ssl=on"),
            "");

  const std::string passfile = pki + "/pgpass";
  write_file(passfile, "127.0.0.1:" + std::to_string(port) + ":keys:keygate:only-in-the-file-7Q\n");
  ASSERT_EQ(chmod(passfile.c_str(), 0600), 0);
  const std::string base = "host=127.0.0.1 port=" + std::to_string(port) +
                           " dbname=keys user=keygate passfile=" + passfile;

  Server s = start_server(
      "tls-db", {},
      state_on(base + " sslmode=verify-full sslrootcert=" + pki + "/ca.pem", "tls-db"));
  ASSERT_GT(s.port, 0) << read_file(s.process.log_path());
  auto [vol, id] = enrolled_volume(&s);
  ASSERT_FALSE(id.empty());
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  // Every connection the server holds is TLS.
  const std::string held =
      PgCluster::query(admin, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'keygate'");
  EXPECT_NE(held, "0");
  EXPECT_EQ(
      PgCluster::query(admin,
                       "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                       "WHERE a.usename = 'keygate' AND s.ssl"),
      held);
  s.process.stop();

  struct Bad {
    std::string conninfo;
    std::string says;
  };
  for (const Bad& bad : {Bad{base + " sslmode=verify-full sslrootcert=" + pki + "/other-ca.pem",
                             "certificate verify"},
                         Bad{base + " sslmode=disable", "pg_hba.conf"},
                         Bad{base + " password=only-in-the-file-7Q", "password file"}}) {
    const std::string state = state_on(bad.conninfo, "bad-db");
    RunResult r = run({bin("keygate-server"), "volumes", "list", "--state-dir", state});
    EXPECT_NE(r.exit_code, 0) << bad.conninfo;
    EXPECT_TRUE(contains(r.err, bad.says)) << bad.conninfo << "\n" << r.err;
    EXPECT_FALSE(contains(r.err, "only-in-the-file")) << r.err;
  }
}

// migrate-store killed while it copies: the database gets nothing of the
// store (one transaction), and the same command run again copies it whole.
TEST_F(ReplicaTest, AMigrationKilledMidCopyWritesNothingAndRunsAgain) {
  ASSERT_EQ(PgCluster::shared().error(), "");
  auto [vol, id] = enrolled_volume();
  ASSERT_FALSE(id.empty());
  server_.process.stop();
  // A long trail, chained as the server chains it, so the copy takes a while.
  constexpr int kRecords = 30000;
  {
    auto store = open_store_of(server_.state);
    ASSERT_NE(store, nullptr);
    auto existing = store->read_audit(0, 1000).value();
    ASSERT_FALSE(existing.empty());
    server::AuditRecord head = existing.back();
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((server_.state + "/keygate.db").c_str(), &db), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(db, "BEGIN", nullptr, nullptr, nullptr), SQLITE_OK);
    sqlite3_stmt* st = nullptr;
    ASSERT_EQ(
        sqlite3_prepare_v2(
            db,
            "INSERT INTO audit(seq, time, event, outcome, volume_id, peer, detail, prev_hash, "
            "hash) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
            -1, &st, nullptr),
        SQLITE_OK);
    for (int i = 0; i < kRecords; ++i) {
      head = server::chain_audit_record(
          &head, head.seq + 1,
          server::AuditEvent{1000 + i, "unlock", "released", id, "127.0.0.1", "bulk"});
      sqlite3_bind_int64(st, 1, head.seq);
      sqlite3_bind_int64(st, 2, head.event.time);
      const std::string* text[] = {&head.event.event, &head.event.outcome, &head.event.volume_id,
                                   &head.event.peer, &head.event.detail};
      for (int c = 0; c < 5; ++c)
        sqlite3_bind_text(st, 3 + c, text[c]->data(), static_cast<int>(text[c]->size()),
                          SQLITE_TRANSIENT);
      sqlite3_bind_blob(st, 8, head.prev_hash.data(), static_cast<int>(head.prev_hash.size()),
                        SQLITE_TRANSIENT);
      sqlite3_bind_blob(st, 9, head.hash.data(), static_cast<int>(head.hash.size()),
                        SQLITE_TRANSIENT);
      ASSERT_EQ(sqlite3_step(st), SQLITE_DONE);
      sqlite3_reset(st);
    }
    sqlite3_finalize(st);
    ASSERT_EQ(sqlite3_exec(db, "COMMIT", nullptr, nullptr, nullptr), SQLITE_OK);
    sqlite3_close(db);
  }
  RunResult before = run({bin("keygate-server"), "audit", "verify", "--state-dir", server_.state});
  ASSERT_EQ(before.exit_code, 0) << before.err;

  const std::string db = PgCluster::shared().create_database();
  ASSERT_NE(db, "");
  Background copy(
      {bin("keygate-server"), "migrate-store", "--state-dir", server_.state, "--to", db},
      dir_ + "/" + unique("migrate") + ".log");
  // Killed once its transaction is writing the trail.
  bool copying = false;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!copying && std::chrono::steady_clock::now() < give_up) {
    copying = PgCluster::query(PgCluster::shared().conninfo("postgres"),
                               "SELECT count(*) FROM pg_stat_activity WHERE datname = '" +
                                   db.substr(db.rfind('=') + 1) +
                                   "' AND query LIKE 'INSERT INTO audit%'") != "0";
    if (!copying) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(copying) << read_file(copy.log_path());
  ASSERT_EQ(kill(copy.pid(), SIGKILL), 0);
  copy.stop();
  EXPECT_FALSE(contains(read_file(copy.log_path()), "copied")) << read_file(copy.log_path());
  for (const char* table : {"audit", "volumes", "enrollment_tokens"}) {
    EXPECT_EQ(PgCluster::query(db, std::string("SELECT count(*) FROM ") + table), "0") << table;
  }

  RunResult again =
      run({bin("keygate-server"), "migrate-store", "--state-dir", server_.state, "--to", db});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(PgCluster::query(db, "SELECT count(*) FROM audit"),
            std::to_string(std::stoll(PgCluster::query(db, "SELECT max(seq) FROM audit"))));
  EXPECT_GT(std::stoll(PgCluster::query(db, "SELECT count(*) FROM audit")), kRecords);
}

// A store file that is not one, or missing, is a clear error.
TEST_F(ReplicaTest, MigrateStoreRefusesWhatIsNotAStore) {
  const std::string db = PgCluster::shared().create_database();
  ASSERT_NE(db, "");
  const std::string garbage = dir_ + "/" + unique("garbage-state");
  ASSERT_EQ(mkdir(garbage.c_str(), 0700), 0);
  write_file(garbage + "/keygate.db", std::string(4096, '\x1b'));
  RunResult r = run({bin("keygate-server"), "migrate-store", "--state-dir", garbage, "--to", db});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.err, "not a database")) << r.err;
  EXPECT_FALSE(contains(r.err, "\x1b")) << r.err;
  const std::string empty = dir_ + "/" + unique("empty-state");
  ASSERT_EQ(mkdir(empty.c_str(), 0700), 0);
  r = run({bin("keygate-server"), "migrate-store", "--state-dir", empty, "--to", db});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(contains(r.err, "no SQLite store at")) << r.err;
  r = run({bin("keygate-server"), "migrate-store", "--state-dir", empty});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(contains(r.err, "usage")) << r.err;
  EXPECT_EQ(PgCluster::query(db, "SELECT count(*) FROM pg_tables WHERE tablename = 'audit'"), "0");
}

}  // namespace
}  // namespace keygate::testing
