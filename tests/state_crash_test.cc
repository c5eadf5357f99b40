// A server killed at any step of its first start (making the store, the KEK
// and the TLS material) leaves a state folder the next start takes up.
//
// strace's fault injection kills the first start at one file-changing
// system call at a time (each write, pwrite, fsync, rename, link, unlink and
// truncate, every invocation of each, as a traced clean start counts them),
// then a normal start must come up on the same folder with a whole KEK and
// TLS material that belongs together.
#include <sys/stat.h>

#include <map>
#include <sstream>

#include "tests/keygate_fixture.h"

namespace keygate::testing {
namespace {

constexpr char kSteps[] = "write,pwrite64,fsync,fdatasync,rename,link,linkat,unlink,unlinkat,ftruncate";

// How many of each call a strace log ("PID  call(..." lines) holds.
std::map<std::string, int> steps_in(const std::string& trace) {
  std::map<std::string, int> counts;
  std::istringstream lines(trace);
  for (std::string line; std::getline(lines, line);) {
    const size_t space = line.find(' '), paren = line.find('(');
    if (space == std::string::npos || paren == std::string::npos || paren < space) continue;
    const size_t call = line.find_first_not_of(' ', space);
    ++counts[line.substr(call, paren - call)];
  }
  return counts;
}

// keygate-server with `args` (shell words, quoted) under strace with
// `strace_args`. LeakSanitizer cannot run under ptrace: off for traced runs
// (the sanitized build's other checks stay on).
RunResult traced_server(const std::string& strace_args, const std::string& args) {
  return run({"bash", "-c", "ASAN_OPTIONS=\"${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0\" strace -f -qq " +
                                strace_args + " '" + bin("keygate-server") + "' " + args});
}

class StateCrashTest : public KeygateTest {
 protected:
  // The first start of a server on `state`, under strace with `strace_args`,
  // until it is killed or writes its port file (then it is killed: strace
  // itself, sent a signal, can take long to let a multi-threaded tracee go).
  // True if it was killed before it listened.
  bool first_start(const std::string& state, const std::vector<std::string>& strace_args) {
    const std::string port = state + ".port";
    std::string command = "strace -f -qq";
    for (const auto& a : strace_args) command += " '" + a + "'";
    command += " '" + bin("keygate-server") + "' serve --state-dir '" + state +
               "' --listen 127.0.0.1:0 --port-file '" + port + "' --aws-trust-dir '" + dir_ +
               "/emu/aws-trust' >>'" + state + ".first.log' 2>&1 & pid=$!; "
               "while [ ! -s '" + port + "' ] && kill -0 $pid 2>/dev/null; do sleep 0.02; done; "
               "if [ -s '" + port + "' ]; then kill -KILL $(pgrep -P $pid); wait $pid; echo listened; "
               "else wait $pid; echo killed; fi";
    RunResult r = run({"bash", "-c", command});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    unlink(port.c_str());
    return contains(r.out, "killed");
  }

  // A normal start on `state` comes up, and what it left is whole.
  void expect_next_start_works(const std::string& state, const std::string& step) {
    Server s = start_server("after-" + step, {}, state);
    ASSERT_GT(s.port, 0) << "after a kill at " << step << ":\n" << read_file(s.process.log_path());
    s.process.stop();
    struct stat st {};
    ASSERT_EQ(stat((state + "/kek").c_str(), &st), 0) << step;
    EXPECT_EQ(st.st_size, 32) << "after a kill at " << step;
    RunResult verify = run({"openssl", "verify", "-CAfile", state + "/ca.pem", state + "/server.pem"});
    EXPECT_EQ(verify.exit_code, 0) << "after a kill at " << step << ": " << verify.out << verify.err;
    RunResult key = run({"bash", "-c", "[ \"$(openssl x509 -noout -pubkey -in '" + state +
                                           "/server.pem')\" = \"$(openssl pkey -pubout -in '" + state +
                                           "/server.key')\" ]"});
    EXPECT_EQ(key.exit_code, 0) << "after a kill at " << step << ": server.key does not match server.pem";
  }
};

TEST_F(StateCrashTest, FirstStartKilledAtEveryStepLeavesAStartableState) {
  // A clean traced first start: how many of each step it makes.
  const std::string counted = dir_ + "/" + unique("counted");
  const std::string trace_log = counted + ".trace";
  ASSERT_FALSE(first_start(counted, {"-e", std::string("trace=") + kSteps, "-o", trace_log}));
  // strace's log is whole once it holds the start's last line (seen, now
  // and then, to land a moment after strace's exit was reported).
  std::string trace;
  for (int i = 0; i < 100 && !contains(trace = read_file(trace_log), "info: listening"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(contains(trace, "info: listening")) << trace;
  std::map<std::string, int> counts;
  std::string main_pid;
  std::istringstream lines(trace);
  for (std::string line; std::getline(lines, line);) {
    // "PID  call(...": strace pads the pid to five columns.
    const size_t space = line.find(' '), paren = line.find('(');
    if (space == std::string::npos || paren == std::string::npos || paren < space) continue;
    const size_t call = line.find_first_not_of(' ', space);
    const std::string pid = line.substr(0, space);
    if (main_pid.empty()) main_pid = pid;
    if (pid != main_pid) continue;  // strace counts per thread; the state is made on the main one
    ++counts[line.substr(call, paren - call)];
  }
  ASSERT_GT(counts["write"] + counts["pwrite64"], 20) << "the trace saw the state being made";

  int kills = 0;
  for (const auto& [call, count] : counts) {
    for (int n = 1; n <= count; ++n) {
      const std::string step = str_cat(call, " #", n);
      const std::string state = dir_ + "/" + unique("killed");
      if (first_start(state, {"-o", "/dev/null", "-e", "trace=" + call, "-e",
                              str_cat("inject=", call, ":signal=KILL:when=", n)})) {
        ++kills;
      }
      expect_next_start_works(state, step);
      if (HasFailure()) return;  // one broken step is enough to read
    }
  }
  EXPECT_GT(kills, 40) << "the first starts were not killed where they should have been";
}

// A store from before the audit hash chain, opened by this version
// (`audit verify` opens it like the server does), killed at every step of
// chaining its trail: what is left is the old trail as it was, or the whole
// chain; the next open finishes the work, with no record lost or doubled.
TEST_F(StateCrashTest, ChainingAnOldTrailKilledAtEveryStepLosesNothing) {
  auto old_store = [&](const std::string& name) {
    const std::string state = dir_ + "/" + unique(name);
    EXPECT_EQ(mkdir(state.c_str(), 0700), 0);
    sqlite3* db = nullptr;
    EXPECT_EQ(sqlite3_open((state + "/keygate.db").c_str(), &db), SQLITE_OK);
    std::string sql =
        "PRAGMA journal_mode=WAL; CREATE TABLE audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, time INTEGER NOT NULL, "
        "event TEXT NOT NULL, outcome TEXT NOT NULL, volume_id TEXT NOT NULL, peer TEXT NOT NULL, "
        "detail TEXT NOT NULL);";
    for (int i = 1; i <= 40; ++i) {
      sql += str_cat("INSERT INTO audit(time, event, outcome, volume_id, peer, detail) VALUES(", i,
                     ", 'unlock', 'released', 'vol-", i, "', '127.0.0.1', 'aws i-", i, "');");
    }
    EXPECT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr), SQLITE_OK);
    sqlite3_close(db);
    return state;
  };
  auto verify = [&](const std::string& state, const std::string& strace_args) {
    return traced_server(strace_args, "audit verify --state-dir '" + state + "'");
  };
  const std::string counted = old_store("chain-counted");
  const std::string trace_log = counted + ".trace";
  RunResult clean = verify(counted, std::string("-o '") + trace_log + "' -e trace=" + kSteps);
  ASSERT_EQ(clean.exit_code, 0) << clean.err;
  ASSERT_TRUE(contains(clean.out, "intact: 41 records")) << clean.out;
  std::map<std::string, int> counts = steps_in(read_file(trace_log));
  ASSERT_GT(counts["pwrite64"] + counts["write"], 3) << read_file(trace_log);
  int kills = 0;
  for (const auto& [call, count] : counts) {
    for (int n = 1; n <= count; ++n) {
      const std::string step = str_cat(call, " #", n);
      const std::string state = old_store("chain-killed");
      RunResult killed = verify(state, str_cat("-o /dev/null -e trace=", call, " -e inject=", call,
                                               ":signal=KILL:when=", n));
      if (killed.exit_code != 0) ++kills;
      RunResult after = verify(state, "-o /dev/null -e trace=none");
      EXPECT_EQ(after.exit_code, 0) << "after a kill at " << step << ": " << after.err;
      EXPECT_TRUE(contains(after.out, "intact: 41 records")) << "after a kill at " << step << ": " << after.out;
      RunResult shown = run({bin("keygate-server"), "audit", "--state-dir", state, "--limit", "100"});
      EXPECT_TRUE(contains(shown.out, "unlock released volume=vol-40 peer=127.0.0.1 aws i-40")) << step << shown.out;
      if (HasFailure()) return;
    }
  }
  EXPECT_GT(kills, 3) << "the chaining was not killed where it should have been";
}

// The first admin certificate (`admin bootstrap`: the admin CA, the
// person's folder, the record), killed at every step: afterwards either
// nothing is in force and bootstrap runs again, or the certificate is
// recorded and its folder is whole (its key and certificate a pair); the
// admin CA is never half made, and the trail is intact.
TEST_F(StateCrashTest, AdminBootstrapKilledAtEveryStepLeavesNoHalfAdmin) {
  auto bootstrap = [&](const std::string& state, const std::string& strace_args) {
    return traced_server(strace_args, "admin bootstrap --name alice --state-dir '" + state + "' --out '" + state + "-alice'");
  };
  const std::string counted = dir_ + "/" + unique("bootstrap-counted");
  const std::string trace_log = counted + ".trace";
  RunResult clean = bootstrap(counted, std::string("-o '") + trace_log + "' -e trace=" + kSteps);
  ASSERT_EQ(clean.exit_code, 0) << clean.err;
  std::map<std::string, int> counts = steps_in(read_file(trace_log));
  ASSERT_GT(counts["write"] + counts["pwrite64"], 8) << read_file(trace_log);
  auto same_key = [&](const std::string& folder) {
    RunResult cert = run({"openssl", "x509", "-noout", "-pubkey", "-in", folder + "/cert.pem"});
    RunResult key = run({"openssl", "pkey", "-pubout", "-in", folder + "/key.pem"});
    return cert.exit_code == 0 && key.exit_code == 0 && cert.out == key.out;
  };
  int kills = 0;
  for (const auto& [call, count] : counts) {
    for (int n = 1; n <= count; ++n) {
      const std::string step = str_cat(call, " #", n);
      const std::string state = dir_ + "/" + unique("bootstrap-killed");
      RunResult killed = bootstrap(state, str_cat("-o /dev/null -e trace=", call, " -e inject=", call,
                                                  ":signal=KILL:when=", n));
      if (killed.exit_code != 0) ++kills;
      RunResult again = run({bin("keygate-server"), "admin", "bootstrap", "--name", "alice", "--state-dir", state,
                             "--out", state + "-alice"});
      if (again.exit_code != 0) {
        // Refused only because the first one is in force, and then whole.
        EXPECT_TRUE(contains(again.err, "an admin certificate is in force already")) << step << ": " << again.err;
      }
      EXPECT_TRUE(same_key(state + "-alice")) << "after a kill at " << step << ": the folder's key and certificate";
      RunResult ca = run({"openssl", "x509", "-noout", "-in", state + "/admin-ca.pem"});
      EXPECT_EQ(ca.exit_code, 0) << "after a kill at " << step << ": " << ca.err;
      RunResult verified = run({bin("keygate-server"), "audit", "verify", "--state-dir", state});
      EXPECT_EQ(verified.exit_code, 0) << "after a kill at " << step << ": " << verified.err;
      if (HasFailure()) return;
    }
  }
  EXPECT_GT(kills, 8) << "bootstrap was not killed where it should have been";
}

}  // namespace
}  // namespace keygate::testing
