// The integration tests' fixture: a real keygate-server process over real
// TLS, the metadata emulator (AWS IMDSv2, signed like AWS signs), the real
// keygate binary, and real LUKS2 headers on loop files (verify-only
// activation: this machine has no device-mapper). Each test gets a server
// and an emulator of its own; the suite shares one emulator state (its CA).
#pragma once

#include <gtest/gtest.h>
#include <httplib.h>
#include <sqlite3.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <regex>
#include <thread>
#include <tuple>

#include "core/crypto.h"
#include "core/envelope.h"
#include "core/json.h"
#include "core/protocol.h"
#include "server/store.h"
#include "tests/harness.h"
#include "unlocker/evidence.h"
#include "unlocker/luks.h"

namespace keygate::testing {

constexpr int kExitUsage = 2;

constexpr int kExitRefused = 3;
constexpr int kExitUnreachable = 4;
constexpr int kExitUntrusted = 5;
constexpr int kExitVolume = 6;

bool contains(const std::string& haystack, const std::string& needle);

struct Identity {
  std::string account = "123456789012";
  std::string region = "us-east-1";
  std::string instance = "i-0aaaaaaaaaaaaaaa1";
  std::string image = "ami-0bbbbbbbbbbbbbbb1";
};

// A metadata emulator process for one identity.
struct Emulator {
  Background process;
  int port = 0;
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port); }
};

// A keygate-server process with its own state folder.
struct Server {
  Background process;
  int port = 0;
  std::string state;
  std::string url() const { return "https://127.0.0.1:" + std::to_string(port); }
  std::string ca() const { return state + "/ca.pem"; }
};

class KeygateTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = make_temp_dir("keygate-it");
    RunResult init = run({bin("keygate-metadata-emulator"), "init", "--state-dir", dir_ + "/emu",
                          "--region", "us-east-1", "--region", "eu-west-1"});
    suite_setup_error_ = init.exit_code == 0 ? "" : "emulator init failed: " + init.err;
  }
  static void TearDownTestSuite() {
    remove_test_dir(dir_, ::testing::UnitTest::GetInstance()->failed_test_count() > 0);
  }

  void SetUp() override {
    // A failed suite set-up must fail every test, not skip it.
    ASSERT_EQ(suite_setup_error_, "");
    server_ = start_server("main");
    ASSERT_GT(server_.port, 0) << read_file(server_.process.log_path());
    emulator_ = start_emulator(Identity{}, dir_ + "/emu");
    ASSERT_GT(emulator_.port, 0);
  }

  void TearDown() override {
    // Servers shut down cleanly on SIGTERM; under the sanitizers a leak or
    // memory error in them is reported in their log.
    server_.process.stop();
    emulator_.process.stop();
    if (!server_.state.empty()) {
      std::string log = read_file(server_.process.log_path());
      EXPECT_FALSE(contains(log, "Sanitizer")) << log;
    }
  }

  static std::string unique(const std::string& name) {
    static std::atomic<int> counter{0};
    return name + "-" + std::to_string(++counter);
  }

  static Server start_server(const std::string& name, std::vector<std::string> extra = {},
                             const std::string& state = "") {
    Server s;
    s.state = state.empty() ? dir_ + "/" + unique("server-" + name) : state;
    std::string port_file = s.state + ".port";
    unlink(port_file.c_str());
    use_test_store(s.state);
    std::vector<std::string> argv = {bin("keygate-server"), "serve",    "--state-dir",
                                     s.state,               "--listen", "127.0.0.1:0",
                                     "--port-file",         port_file,  "--aws-trust-dir",
                                     dir_ + "/emu/aws-trust"};
    for (auto& e : extra) argv.push_back(e);
    s.process = Background(argv, s.state + ".log");
    s.port = wait_for_port_file(port_file, s.process);
    return s;
  }

  // With KEYGATE_TEST_STORE=postgresql (ctest's pg.* pass), a server's
  // state folder names a PostgreSQL database of its own in the run's
  // cluster (store.conf), so the server and every command run with that
  // folder use it.
  static void use_test_store(const std::string& state);

 public:
  // Whether this run's servers keep their store in PostgreSQL.
  static bool on_postgres();
  // The connection string in `state`'s store.conf (PostgreSQL only).
  static std::string conninfo_of(const std::string& state);
  // The store of `state`, opened as the server opens it (its SQLite file,
  // or its PostgreSQL database); the server should be stopped.
  static std::unique_ptr<server::Store> open_store_of(const std::string& state);
  // Runs SQL on the PostgreSQL store of `state` behind the server's back;
  // "" or the error.
  static std::string store_sql(const std::string& state, const std::string& sql);

 protected:
  static Emulator start_emulator(const Identity& id, const std::string& state) {
    Emulator e;
    std::string port_file = dir_ + "/" + unique("emu") + ".port";
    e.process = Background({bin("keygate-metadata-emulator"), "serve", "--state-dir", state,
                            "--listen", "127.0.0.1:0", "--port-file", port_file, "--account",
                            id.account, "--region", id.region, "--instance-id", id.instance,
                            "--image-id", id.image},
                           port_file + ".log");
    e.port = wait_for_port_file(port_file, e.process);
    return e;
  }

  std::string make_token(const Server& server, std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {bin("keygate-server"), "token", "create", "--state-dir",
                                     server.state};
    for (auto& e : extra) argv.push_back(e);
    RunResult r = run(argv);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string path = dir_ + "/" + unique("token");
    write_file(path, r.out);
    return path;
  }

  std::string new_volume_file() {
    std::string path = dir_ + "/" + unique("vol") + ".img";
    RunResult r = run({"truncate", "-s", "32M", path});
    EXPECT_EQ(r.exit_code, 0);
    return path;
  }

  RunResult enroll_format(const std::string& volume, const Server& server,
                          const std::string& token, const Emulator& emu,
                          std::vector<std::string> extra_servers = {}) {
    std::vector<std::string> argv = {bin("keygate"), "enroll", volume, "--format", "--no-recovery"};
    for (auto& s : extra_servers) {
      argv.push_back("--server");
      argv.push_back(s);
    }
    for (const std::string& a : {std::string("--server"), server.url(), std::string("--ca"),
                                 server.ca(), std::string("--enrollment-token-file"), token,
                                 std::string("--metadata-url"), emu.url()}) {
      argv.push_back(a);
    }
    return run(argv);
  }

  // Enrolls a fresh volume with `server` (the main one by default); returns
  // (path, volume id), the id empty if enrollment failed.
  std::pair<std::string, std::string> enrolled_volume(const Server* server = nullptr) {
    const Server& s = server != nullptr ? *server : server_;
    std::string vol = new_volume_file();
    RunResult r = enroll_format(vol, s, make_token(s), emulator_);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::smatch m;
    std::regex re("enrolled as volume ([0-9a-f-]+)");
    EXPECT_TRUE(std::regex_search(r.out, m, re)) << r.out;
    return {vol, m.size() > 1 ? m[1].str() : ""};
  }

  // A server of its own with one volume enrolled on it, then stopped: a key
  // server that is down, its port and state kept for a restart.
  struct DownServer {
    std::string name;
    Server server;
    std::string volume, volume_id;
  };
  DownServer enrolled_then_down(const std::string& name) {
    DownServer d{name, start_server(name), "", ""};
    EXPECT_GT(d.server.port, 0);
    std::tie(d.volume, d.volume_id) = enrolled_volume(&d.server);
    EXPECT_FALSE(d.volume_id.empty());
    d.server.process.stop();
    return d;
  }
  // Starts it again, on its port and with its state, `delay_ms` from now.
  std::thread restart_later(DownServer& d, int delay_ms) {
    return std::thread([this, &d, delay_ms] {
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
      d.server = start_server(d.name, {"--listen", "127.0.0.1:" + std::to_string(d.server.port)},
                              d.server.state);
    });
  }

  // The server's audit trail, as the host's `keygate-server audit` prints it.
  std::string audit_text(const Server& server) {
    return run({bin("keygate-server"), "audit", "--state-dir", server.state, "--limit", "1000"})
        .out;
  }

  // Writes `text` to `server`'s policy file and sends SIGHUP; returns once
  // the trail holds `loads` policy.load records (the reload's, either way).
  void reload_policy_file(const Server& server, const std::string& file, const std::string& text,
                          size_t loads) {
    write_file(file, text);
    EXPECT_EQ(kill(server.process.pid(), SIGHUP), 0);
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < give_up) {
      const std::string trail = audit_text(server);
      size_t n = 0;
      for (size_t at = trail.find("policy.load"); at != std::string::npos;
           at = trail.find("policy.load", at + 1))
        ++n;
      if (n >= loads) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ADD_FAILURE() << "the reload was not audited: " << audit_text(server);
  }

  RunResult unlock(const std::string& volume, const Emulator& emu) {
    return run({bin("keygate"), "unlock", volume, "--verify-only", "--metadata-url", emu.url(),
                "--timeout", "5"});
  }

  std::unique_ptr<httplib::SSLClient> api_client(const Server& server) {
    auto cli = std::make_unique<httplib::SSLClient>("127.0.0.1", server.port);
    cli->set_ca_cert_path(server.ca().c_str());
    cli->enable_server_certificate_verification(true);
    cli->set_connection_timeout(5);
    cli->set_read_timeout(5);
    return cli;
  }

  Json::Value aws_evidence(const Emulator& emu) {
    auto e = unlocker::collect_aws_evidence(emu.url(), 5000);
    EXPECT_TRUE(e.is_ok()) << e.status().message();
    return e.is_ok() ? e.value() : Json::Value();
  }

  Bytes fresh_nonce(const Server& server) {
    auto res = api_client(server)->Post(api::kChallengePath, "{}", "application/json");
    EXPECT_TRUE(res);
    if (!res) return {};
    EXPECT_EQ(res->status, 200);
    auto body = parse_json_object(res->body);
    return base64_decode(body.value()["nonce"].asString()).value();
  }

  static std::string dir_;
  static std::string suite_setup_error_;
  Server server_;
  Emulator emulator_;
};

// `args` run by the real cryptsetup with the build's token plugin: the
// plugin folder is bound over libcryptsetup's plugin path in a private
// mount namespace, so the host's installed plugins are untouched.
RunResult cryptsetup_with_plugin(const std::string& args, const std::string& plugin_env);

}  // namespace keygate::testing
