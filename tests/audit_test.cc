// The audit trail's hash chain through the real server and its commands:
// records written by enrollments, releases and refusals over real TLS are
// one chain; `keygate-server audit verify` finds a record hand-edited,
// deleted or reordered in the database, and names it; `audit export` writes
// what an auditor can verify apart from the server (fixture:
// keygate_fixture.h).
#include <signal.h>
#include <sys/wait.h>

#include <sys/stat.h>

#include <algorithm>
#include <sstream>

#include "server/audit_chain.h"
#include "server/store.h"
#include "tests/keygate_fixture.h"
#include "tests/pg_cluster.h"

namespace keygate::testing {
namespace {

constexpr int kExitChainBroken = 3;

class AuditTrailTest : public KeygateTest {
 protected:
  // A trail of real events: two enrollments, releases and a refusal.
  void write_some_events() {
    auto [vol, id] = enrolled_volume();
    ASSERT_FALSE(id.empty());
    for (int i = 0; i < 3; ++i) ASSERT_EQ(unlock(vol, emulator_).exit_code, 0);
    auto second = enrolled_volume();
    ASSERT_EQ(run({bin("keygate-server"), "volumes", "revoke", second.second, "--state-dir", server_.state}).exit_code, 0);
    ASSERT_EQ(unlock(second.first, emulator_).exit_code, kExitRefused);
  }

  // A copy of the server's store, to tamper with: a state folder holding
  // a copy of its SQLite file, or naming a copy of its PostgreSQL database
  // (pg_dump into a new database of the run's cluster).
  std::string copy_of_store(const std::string& name) {
    const std::string dir = server_.state + "-" + name;
    EXPECT_EQ(run({"mkdir", "-p", dir}).exit_code, 0);
    if (on_postgres()) {
      const std::string copy = PgCluster::shared().create_database();
      EXPECT_NE(copy, "");
      RunResult dumped =
          run({"sh", "-c", "pg_dump \"$1\" | psql -q -v ON_ERROR_STOP=1 \"$2\" >/dev/null", "sh",
               conninfo_of(server_.state), copy});
      EXPECT_EQ(dumped.exit_code, 0) << dumped.err;
      write_file(dir + "/store.conf", copy + "\n");
      return dir;
    }
    sqlite3* db = nullptr;
    EXPECT_EQ(sqlite3_open((server_.state + "/keygate.db").c_str(), &db), SQLITE_OK);
    EXPECT_EQ(exec(db, "VACUUM INTO '" + dir + "/keygate.db'"), "");
    sqlite3_close(db);
    return dir;
  }

  static std::string exec(sqlite3* db, const std::string& sql) {
    char* err = nullptr;
    const int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err);
    std::string msg = rc == SQLITE_OK ? "" : (err ? err : "error");
    sqlite3_free(err);
    return msg;
  }
  // Runs SQL on the store of `state`, behind the server's back.
  static void tamper(const std::string& state, const std::string& sql) {
    if (on_postgres()) {
      EXPECT_EQ(store_sql(state, sql), "") << sql;
      return;
    }
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((state + "/keygate.db").c_str(), &db), SQLITE_OK);
    EXPECT_EQ(exec(db, sql), "") << sql;
    sqlite3_close(db);
  }
  // The first column of the first row SQL returns on the store of `state`.
  static std::string query(const std::string& state, const std::string& sql) {
    if (on_postgres()) return PgCluster::query(conninfo_of(state), sql);
    sqlite3* db = nullptr;
    std::string out;
    if (sqlite3_open((state + "/keygate.db").c_str(), &db) == SQLITE_OK) {
      sqlite3_stmt* st = nullptr;
      if (sqlite3_prepare_v2(db, sql.c_str(), -1, &st, nullptr) == SQLITE_OK &&
          sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0) != nullptr) {
        out = reinterpret_cast<const char*>(sqlite3_column_text(st, 0));
      }
      sqlite3_finalize(st);
    }
    sqlite3_close(db);
    return out;
  }
  // A byte string as an SQL literal of the store's dialect.
  static std::string blob(const Bytes& b) {
    return on_postgres() ? "'\\x" + hex_encode(b) + "'::bytea" : "x'" + hex_encode(b) + "'";
  }
  RunResult verify(const std::string& state, std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {bin("keygate-server"), "audit", "verify", "--state-dir", state};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return run(argv);
  }
  static std::string head_of(const RunResult& r) {
    std::smatch m;
    return std::regex_search(r.out, m, std::regex("head (\\d+:[0-9a-f]{64})")) ? m[1].str() : "";
  }
};

TEST_F(AuditTrailTest, TheServersTrailIsOneChainAndVerifies) {
  write_some_events();
  RunResult ok = verify(server_.state);
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(ok.out, m, std::regex("audit trail intact: (\\d+) records; head (\\d+):"))) << ok.out;
  // Two token.create, two registers and confirms, three releases, a
  // revoke and a refusal: numbered 1 to N with none missing.
  EXPECT_GE(std::stoi(m[1].str()), 11) << ok.out;
  EXPECT_EQ(m[1].str(), m[2].str());
}

TEST_F(AuditTrailTest, AHandEditedRecordIsNamed) {
  write_some_events();
  const std::string state = copy_of_store("edited");
  // A release rewritten as a refusal, as someone covering a release would.
  tamper(state, "UPDATE audit SET outcome = 'refused' WHERE seq = "
                "(SELECT MIN(seq) FROM audit WHERE event = 'unlock' AND outcome = 'released')");
  const std::string seq =
      query(state, "SELECT MIN(seq) FROM audit WHERE event = 'unlock' AND outcome = 'refused'");
  ASSERT_FALSE(seq.empty());
  RunResult r = verify(state);
  EXPECT_EQ(r.exit_code, kExitChainBroken) << r.out << r.err;
  EXPECT_TRUE(contains(r.err, "audit trail broken: record " + seq + " (")) << r.err;
  EXPECT_TRUE(contains(r.err, "unlock refused volume")) << r.err;
  EXPECT_TRUE(contains(r.err, "does not match its hash")) << r.err;
  EXPECT_FALSE(contains(r.out, "intact")) << r.out;
}

TEST_F(AuditTrailTest, ADeletedRecordIsNamed) {
  write_some_events();
  const std::string state = copy_of_store("deleted");
  tamper(state, "DELETE FROM audit WHERE seq = 4");
  RunResult r = verify(state);
  EXPECT_EQ(r.exit_code, kExitChainBroken) << r.out << r.err;
  EXPECT_TRUE(contains(r.err, "record 5 (")) << r.err;
  EXPECT_TRUE(contains(r.err, "follows record 3; record 4 is missing")) << r.err;
  // The first one too.
  const std::string first = copy_of_store("first-deleted");
  tamper(first, "DELETE FROM audit WHERE seq = 1");
  r = verify(first);
  EXPECT_EQ(r.exit_code, kExitChainBroken) << r.err;
  EXPECT_TRUE(contains(r.err, "record 2 (")) << r.err;
  EXPECT_TRUE(contains(r.err, "record 1 is missing")) << r.err;
}

TEST_F(AuditTrailTest, ReorderedRecordsAreFound) {
  write_some_events();
  const std::string state = copy_of_store("reordered");
  // Records 3 and 4 trade places (numbers swapped, content kept).
  tamper(state,
         "UPDATE audit SET seq = -1 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = 4; "
         "UPDATE audit SET seq = 4 WHERE seq = -1;");
  RunResult r = verify(state);
  EXPECT_EQ(r.exit_code, kExitChainBroken) << r.err;
  EXPECT_TRUE(contains(r.err, "record 3 (")) << r.err;
  EXPECT_TRUE(contains(r.err, "does not match record 2")) << r.err;
  // The same with the moved records' hashes recomputed for their new
  // places: the link after them breaks.
  const std::string rehashed = copy_of_store("rehashed");
  tamper(rehashed,
         "UPDATE audit SET seq = -1 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = 4; "
         "UPDATE audit SET seq = 4 WHERE seq = -1;");
  std::vector<server::AuditRecord> records;
  {
    auto store = open_store_of(rehashed);
    ASSERT_NE(store, nullptr);
    records = store->read_audit(0, 4).value();
  }
  ASSERT_EQ(records.size(), 4u);
  Bytes prev = records[1].hash;
  for (int seq = 3; seq <= 4; ++seq) {
    const Bytes hash = server::audit_record_hash(seq, records[seq - 1].event, prev);
    tamper(rehashed, "UPDATE audit SET prev_hash = " + blob(prev) + ", hash = " + blob(hash) +
                         " WHERE seq = " + std::to_string(seq));
    prev = hash;
  }
  r = verify(rehashed);
  EXPECT_EQ(r.exit_code, kExitChainBroken) << r.err;
  EXPECT_TRUE(contains(r.err, "record 5 (")) << r.err;
  EXPECT_TRUE(contains(r.err, "does not match record 4")) << r.err;
}

// Records cut from the end: the chain alone cannot tell, a head kept from
// an earlier verify can, and so can the next record the server writes.
TEST_F(AuditTrailTest, ATrailCutBackIsFoundByAKeptHeadAndByTheNextRecord) {
  write_some_events();
  const std::string kept = head_of(verify(server_.state));
  ASSERT_FALSE(kept.empty());
  const std::string state = copy_of_store("cut");
  tamper(state, "DELETE FROM audit WHERE seq > 5");
  EXPECT_EQ(verify(state).exit_code, 0);  // what is left is consistent
  RunResult r = verify(state, {"--head", kept});
  EXPECT_EQ(r.exit_code, kExitChainBroken) << r.err;
  EXPECT_TRUE(contains(r.err, "ends at record 5, before the head given")) << r.err;
  // The server goes on writing on the cut trail: the gap shows.
  ASSERT_EQ(run({bin("keygate-server"), "token", "create", "--state-dir", state}).exit_code, 0);
  r = verify(state);
  EXPECT_EQ(r.exit_code, kExitChainBroken) << r.err;
  EXPECT_TRUE(contains(r.err, "follows record 5; records 6 to ")) << r.err;
  // On the intact trail, the kept head is found.
  EXPECT_EQ(verify(server_.state, {"--head", kept}).exit_code, 0);
  // A head that is not one.
  RunResult bad = verify(server_.state, {"--head", "7:abc"});
  EXPECT_EQ(bad.exit_code, kExitUsage);
  EXPECT_TRUE(contains(bad.err, "use SEQ:HASH")) << bad.err;
}

// An export verifies apart from the store, to the same head; a byte changed,
// a line removed, or lines swapped in it are found and named.
TEST_F(AuditTrailTest, AnExportVerifiesApartAndItsTamperingIsFound) {
  write_some_events();
  const std::string out = server_.state + "-export.jsonl";
  RunResult ex = run({bin("keygate-server"), "audit", "export", "--state-dir", server_.state, "--output", out});
  ASSERT_EQ(ex.exit_code, 0) << ex.err;
  EXPECT_TRUE(contains(ex.err, "exported ")) << ex.err;
  struct stat st;
  ASSERT_EQ(stat(out.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 077, 0u);
  EXPECT_NE(stat((out + ".tmp").c_str(), &st), 0);  // nothing left behind
  // To standard output, the same bytes.
  RunResult to_stdout = run({bin("keygate-server"), "audit", "export", "--state-dir", server_.state});
  ASSERT_EQ(to_stdout.exit_code, 0) << to_stdout.err;
  const std::string text = read_file(out);
  EXPECT_EQ(to_stdout.out, text);
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    EXPECT_TRUE(parse_json_object(line).is_ok()) << line;
    lines.push_back(line);
  }
  ASSERT_GE(lines.size(), 8u);
  RunResult from_file = verify(server_.state, {"--file", out});
  ASSERT_EQ(from_file.exit_code, 0) << from_file.err;
  EXPECT_EQ(head_of(from_file), head_of(verify(server_.state)));

  auto write_lines = [&](const std::string& name, const std::vector<std::string>& ls, const std::string& tail = "") {
    std::string body;
    for (const auto& l : ls) body += l + "\n";
    const std::string path = server_.state + "-" + name + ".jsonl";
    write_file(path, body + tail);
    return path;
  };
  auto edited = lines;
  size_t line = 1;
  while (line < edited.size() && !contains(edited[line], "\"outcome\":\"released\"")) ++line;
  ASSERT_LT(line, edited.size());
  const std::string released = "\"outcome\":\"released\"";
  edited[line].replace(edited[line].find(released), released.size(), "\"outcome\":\"refused\"");
  RunResult r = verify(server_.state, {"--file", write_lines("edited", edited)});
  EXPECT_EQ(r.exit_code, kExitChainBroken);
  EXPECT_TRUE(contains(r.err, "record " + std::to_string(line + 1) + " (")) << r.err;
  EXPECT_TRUE(contains(r.err, "does not match its hash")) << r.err;

  auto removed = lines;
  removed.erase(removed.begin() + 4);
  r = verify(server_.state, {"--file", write_lines("removed", removed)});
  EXPECT_EQ(r.exit_code, kExitChainBroken);
  EXPECT_TRUE(contains(r.err, "record 5 is missing")) << r.err;

  auto swapped = lines;
  std::swap(swapped[1], swapped[2]);
  r = verify(server_.state, {"--file", write_lines("swapped", swapped)});
  EXPECT_EQ(r.exit_code, kExitChainBroken);
  EXPECT_TRUE(contains(r.err, "record 3 (")) << r.err;

  // Not an export: garbage, a control character, a line cut short, a line
  // longer than any record; each named by its line, escaped.
  auto garbage = lines;
  garbage.insert(garbage.begin() + 3, "\x1b[2J{not json");
  r = verify(server_.state, {"--file", write_lines("garbage", garbage)});
  EXPECT_EQ(r.exit_code, kExitChainBroken);
  EXPECT_TRUE(contains(r.err, "line 4: malformed JSON")) << r.err;
  for (unsigned char c : r.err) EXPECT_TRUE(c == '\n' || (c >= 0x20 && c < 0x7f)) << r.err;
  r = verify(server_.state, {"--file", write_lines("cut", lines, lines[0].substr(0, 20))});
  EXPECT_EQ(r.exit_code, kExitChainBroken);
  EXPECT_TRUE(contains(r.err, "cut short")) << r.err;
  r = verify(server_.state, {"--file", write_lines("long", lines, std::string(3 << 20, 'x') + "\n")});
  EXPECT_EQ(r.exit_code, kExitChainBroken);
  EXPECT_TRUE(contains(r.err, "longer than any record")) << r.err;
  r = verify(server_.state, {"--file", server_.state + "-no-such-file"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.err, "no-such-file")) << r.err;
}

// A broken trail is still exported whole (it is the evidence), and said.
TEST_F(AuditTrailTest, ABrokenTrailIsExportedWholeAndSaid) {
  write_some_events();
  const std::string state = copy_of_store("broken-export");
  tamper(state, "UPDATE audit SET detail = 'x' WHERE seq = 2");
  const std::string out = state + "/export.jsonl";
  RunResult ex = run({bin("keygate-server"), "audit", "export", "--state-dir", state, "--output", out});
  EXPECT_EQ(ex.exit_code, kExitChainBroken) << ex.err;
  EXPECT_TRUE(contains(ex.err, "record 2 (")) << ex.err;
  std::smatch said;
  ASSERT_TRUE(std::regex_search(ex.err, said, std::regex("exported (\\d+) records; last \\d+:"))) << ex.err;
  RunResult all = run({bin("keygate-server"), "audit", "verify", "--state-dir", server_.state});
  std::smatch m;
  ASSERT_TRUE(std::regex_search(all.out, m, std::regex("(\\d+) records"))) << all.out;
  const std::string text = read_file(out);
  EXPECT_EQ(static_cast<size_t>(std::count(text.begin(), text.end(), '\n')), std::stoul(m[1].str()));
  EXPECT_EQ(said[1].str(), m[1].str());
}

// The server killed (SIGKILL) while releases are being written: the trail it
// leaves is an unbroken chain, and a restarted server chains on.
TEST_F(AuditTrailTest, AServerKilledMidWriteLeavesAnUnbrokenChain) {
  auto [vol, id] = enrolled_volume();
  ASSERT_FALSE(id.empty());
  std::vector<std::thread> clients;
  std::atomic<bool> stop{false};
  for (int t = 0; t < 4; ++t) {
    clients.emplace_back([&] {
      while (!stop) (void)unlock(vol, emulator_);
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  const int port = server_.port;
  kill(server_.process.pid(), SIGKILL);
  stop = true;
  for (auto& c : clients) c.join();
  server_.process.stop();
  RunResult r = verify(server_.state);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex("(\\d+) records"))) << r.out;
  const int before = std::stoi(m[1].str());
  EXPECT_GT(before, 4) << "no release was written before the kill";
  server_ = start_server("after-kill", {"--listen", "127.0.0.1:" + std::to_string(port)}, server_.state);
  ASSERT_GT(server_.port, 0);
  // The clients spent the instance's rate-limit bucket; a store that keeps
  // its buckets (PostgreSQL) still remembers that after the restart, so
  // this unlock waits its turn, as a booting instance would.
  RunResult after = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url", emulator_.url(),
                         "--timeout", "5", "--deadline", "30"});
  EXPECT_EQ(after.exit_code, 0) << after.err;
  r = verify(server_.state);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex("(\\d+) records"))) << r.out;
  EXPECT_GT(std::stoi(m[1].str()), before);
}

}  // namespace
}  // namespace keygate::testing
