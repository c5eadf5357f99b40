// End-to-end over real components: the real keygate-server process over real
// TLS, the metadata emulator (AWS IMDSv2, signed like AWS signs), the real
// keygate binary, and real LUKS2 headers on loop files (verify-only
// activation: this machine has no device-mapper).
#include <gtest/gtest.h>
#include <httplib.h>
#include <sqlite3.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <regex>
#include <thread>

#include "core/crypto.h"
#include "core/envelope.h"
#include "core/json.h"
#include "core/protocol.h"
#include "harness.h"
#include "unlocker/evidence.h"
#include "unlocker/luks.h"

namespace keygate::testing {
namespace {

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
    std::vector<std::string> argv = {bin("keygate-server"), "serve",    "--state-dir",
                                     s.state,               "--listen", "127.0.0.1:0",
                                     "--port-file",         port_file,  "--aws-trust-dir",
                                     dir_ + "/emu/aws-trust"};
    for (auto& e : extra) argv.push_back(e);
    s.process = Background(argv, s.state + ".log");
    s.port = wait_for_port_file(port_file, s.process);
    return s;
  }

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

std::string KeygateTest::dir_;
std::string KeygateTest::suite_setup_error_;

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

TEST_F(KeygateTest, EnrollThenUnlockSucceeds) {
  auto [vol, id] = enrolled_volume();
  ASSERT_FALSE(id.empty());
  RunResult r = unlock(vol, emulator_);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, "opens keyslot")) << r.out;

  RunResult status = run({bin("keygate"), "status", vol, "--json"});
  ASSERT_EQ(status.exit_code, 0) << status.err;
  auto j = parse_json_object(status.out);
  ASSERT_TRUE(j.is_ok());
  EXPECT_EQ(j.value()["keygate"]["volume_id"].asString(), id);
  EXPECT_EQ(j.value()["keyslots"][0]["kdf"].asString(), "pbkdf2");

  RunResult list = run({bin("keygate-server"), "volumes", "list", "--json", "--state-dir",
                        server_.state});
  ASSERT_EQ(list.exit_code, 0);
  EXPECT_TRUE(contains(list.out, id));
  EXPECT_TRUE(contains(list.out, "\"active\""));
}

TEST_F(KeygateTest, KeyscriptPipesTheKeyToCryptsetup) {
  auto [vol, id] = enrolled_volume();
  const std::string keygate = bin("keygate");
  RunResult piped = run({"sh", "-c",
                         keygate + " keyscript '" + vol + "' --metadata-url " + emulator_.url() +
                             " | cryptsetup open --test-passphrase --key-file - '" + vol + "'"});
  EXPECT_EQ(piped.exit_code, 0) << piped.err;
  // Revoked: nothing is written, so cryptsetup gets no key.
  ASSERT_EQ(run({bin("keygate-server"), "volumes", "revoke", id, "--state-dir", server_.state})
                .exit_code,
            0);
  RunResult refused = run({"sh", "-c", keygate + " keyscript '" + vol + "' --metadata-url " +
                                           emulator_.url() + " | wc -c"});
  EXPECT_EQ(refused.out, "0\n") << refused.err;
  EXPECT_TRUE(contains(refused.err, "revoked")) << refused.err;
}

// The token plugin, loaded by the real cryptsetup: the build's plugin folder
// is bound over libcryptsetup's plugin path in a private mount namespace, so
// the host's installed plugins are untouched.
#ifndef KEYGATE_PLUGIN_HOST_ENV
#define KEYGATE_PLUGIN_HOST_ENV ""
#endif

RunResult cryptsetup_with_plugin(const std::string& args, const std::string& plugin_env) {
  const std::string env = std::string(KEYGATE_PLUGIN_HOST_ENV) + " " + plugin_env;
  const std::string plugins = std::string(KEYGATE_BIN_DIR) + "/../lib/cryptsetup";
  const std::string target = KEYGATE_TOKEN_PLUGIN_DIR;
  return run({"unshare", "-m", "sh", "-c",
              "mkdir -p '" + target + "' && mount --bind '" + plugins + "' '" + target + "' && " +
                  env + " cryptsetup " + args});
}

TEST_F(KeygateTest, TokenPluginOpensTheVolumeThroughCryptsetup) {
  auto [vol, id] = enrolled_volume();
  const std::string env = "KEYGATE_DEADLINE=0 KEYGATE_METADATA_URL=" + emulator_.url();
  RunResult opened =
      cryptsetup_with_plugin("open --test-passphrase --token-only -v '" + vol + "'", env);
  EXPECT_EQ(opened.exit_code, 0) << opened.out << opened.err;
  EXPECT_TRUE(contains(opened.out, "Key slot 0 unlocked")) << opened.out;
  RunResult dump = cryptsetup_with_plugin("luksDump '" + vol + "'", env);
  EXPECT_TRUE(contains(dump.out, "Volume:     " + id)) << dump.out;

  ASSERT_EQ(run({bin("keygate-server"), "volumes", "revoke", id, "--state-dir", server_.state})
                .exit_code,
            0);
  RunResult refused =
      cryptsetup_with_plugin("open --test-passphrase --token-only '" + vol + "'", env);
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_TRUE(contains(refused.err, "revoked")) << refused.err;
}

TEST_F(KeygateTest, ServerReadsItsConfigFileAndRejectsUnknownKeys) {
  std::string state = dir_ + "/" + unique("configured");
  std::string port_file = state + ".port";
  std::string config = dir_ + "/" + unique("server") + ".json";
  write_file(config, "{\"listen\": \"127.0.0.1:0\", \"state_dir\": \"" + state +
                         "\", \"aws_trust_dirs\": [\"" + dir_ + "/emu/aws-trust\"], \"nonce_ttl\": 30}");
  Background srv({bin("keygate-server"), "serve", "--config", config, "--port-file", port_file},
                 state + ".log");
  int port = wait_for_port_file(port_file, srv);
  ASSERT_GT(port, 0) << read_file(state + ".log");
  // The emulator's certificates came from the config file's aws_trust_dirs:
  // enrollment verifies the instance's evidence against them.
  Server configured;
  configured.state = state;
  configured.port = port;
  std::string vol = new_volume_file();
  RunResult e = enroll_format(vol, configured, make_token(configured), emulator_);
  EXPECT_EQ(e.exit_code, 0) << e.err;
  srv.stop();
  std::string bad = dir_ + "/" + unique("bad") + ".json";
  write_file(bad, "{\"listen\": \"127.0.0.1:0\", \"lisen\": 1}");
  RunResult r = run({bin("keygate-server"), "serve", "--config", bad});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(contains(r.err, "unknown key 'lisen'")) << r.err;
}

TEST_F(KeygateTest, EnrollExistingVolumeKeepsItsPassphrase) {
  std::string vol = new_volume_file();
  std::string pass = dir_ + "/" + unique("pass");
  write_file(pass, "operator passphrase\n");
  RunResult fmt = run({"cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf",
                       "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", pass, vol});
  ASSERT_EQ(fmt.exit_code, 0) << fmt.err;

  std::string wrong = dir_ + "/" + unique("wrong");
  write_file(wrong, "not it\n");
  std::vector<std::string> base = {bin("keygate"), "enroll", vol, "--server", server_.url(),
                                   "--ca", server_.ca(), "--enrollment-token-file",
                                   make_token(server_), "--metadata-url", emulator_.url(),
                                   "--passphrase-file"};
  std::vector<std::string> bad = base;
  bad.push_back(wrong);
  RunResult refused = run(bad);
  EXPECT_EQ(refused.exit_code, kExitVolume) << refused.err;
  EXPECT_TRUE(contains(refused.err, "opens no keyslot")) << refused.err;

  std::vector<std::string> good = base;
  good.push_back(pass);
  RunResult enrolled = run(good);
  ASSERT_EQ(enrolled.exit_code, 0) << enrolled.err;
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  // The original passphrase still opens the volume.
  RunResult old = run({"cryptsetup", "open", "--test-passphrase", "--key-file", pass, vol});
  EXPECT_EQ(old.exit_code, 0) << old.err;
  // A second enrollment of the same volume is refused, not duplicated.
  RunResult again = run(good);
  EXPECT_EQ(again.exit_code, kExitVolume);
  EXPECT_TRUE(contains(again.err, "already enrolled")) << again.err;
}

TEST_F(KeygateTest, OtherAccountRegionOrInstanceIsRefused) {
  auto [vol, id] = enrolled_volume();
  Identity account, region, instance;
  account.account = "999999999999";
  region.region = "eu-west-1";
  instance.instance = "i-0ccccccccccccccc9";
  for (const Identity& other : {account, region, instance}) {
    Emulator emu = start_emulator(other, dir_ + "/emu");
    ASSERT_GT(emu.port, 0);
    RunResult r = unlock(vol, emu);
    EXPECT_EQ(r.exit_code, kExitRefused) << r.err;
    EXPECT_TRUE(contains(r.err, "policy_denied")) << r.err;
    EXPECT_FALSE(contains(r.out, "opens keyslot"));
  }
  RunResult audit = run({bin("keygate-server"), "audit", "--state-dir", server_.state});
  EXPECT_TRUE(contains(audit.out, "account_id mismatch")) << audit.out;
  EXPECT_TRUE(contains(audit.out, "region mismatch")) << audit.out;
  EXPECT_TRUE(contains(audit.out, "instance_id mismatch")) << audit.out;
  // The right instance still unlocks.
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
}

TEST_F(KeygateTest, ForgedIdentityDocumentIsRefused) {
  auto [vol, id] = enrolled_volume();
  // Signed by a CA the server does not trust (same identity, other keys).
  Emulator forger = start_emulator(Identity{}, dir_ + "/" + unique("forger"));
  ASSERT_GT(forger.port, 0);
  RunResult r = unlock(vol, forger);
  EXPECT_EQ(r.exit_code, kExitRefused) << r.err;
  EXPECT_TRUE(contains(r.err, "evidence_invalid")) << r.err;

  // A genuine signature with one byte of the document changed.
  Json::Value evidence = aws_evidence(emulator_);
  Bytes der = base64_decode(evidence["aws"]["rsa2048"].asString(), true).value();
  std::string as_text(der.begin(), der.end());
  size_t at = as_text.find("123456789012");
  ASSERT_NE(at, std::string::npos);
  der[at] = '9';
  evidence["aws"]["rsa2048"] = base64_encode(der);
  auto keys = X25519KeyPair::generate().value();
  Json::Value req;
  req["volume_id"] = id;
  req["nonce"] = base64_encode(fresh_nonce(server_));
  req["client_public_key"] = base64_encode(keys.public_key.data(), keys.public_key.size());
  req["evidence"] = evidence;
  auto res = api_client(server_)->Post(api::kUnlockPath, to_json(req), "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 403);
  EXPECT_TRUE(contains(res->body, "evidence_invalid")) << res->body;
  EXPECT_FALSE(contains(res->body, "wrapped"));
}

TEST_F(KeygateTest, NonceIsSingleUse) {
  auto [vol, id] = enrolled_volume();
  auto keys = X25519KeyPair::generate().value();
  Bytes nonce = fresh_nonce(server_);
  Json::Value req;
  req["volume_id"] = id;
  req["nonce"] = base64_encode(nonce);
  req["client_public_key"] = base64_encode(keys.public_key.data(), keys.public_key.size());
  req["evidence"] = aws_evidence(emulator_);
  auto cli = api_client(server_);
  auto first = cli->Post(api::kUnlockPath, to_json(req), "application/json");
  ASSERT_TRUE(first);
  ASSERT_EQ(first->status, 200) << first->body;
  // The released secret really opens the volume's keyslot.
  auto wrapped = WrappedSecret::from_json(parse_json_object(first->body).value()["wrapped"]);
  ASSERT_TRUE(wrapped.is_ok());
  auto secret = unwrap_secret(wrapped.value(), keys, id, nonce);
  ASSERT_TRUE(secret.is_ok()) << secret.status().message();
  auto dev = unlocker::LuksDevice::open(vol);
  ASSERT_TRUE(dev.is_ok());
  EXPECT_TRUE(dev->activate("", -1, secret.value()).is_ok());
  // The secret appears in no server log line and not in the store in clear.
  std::string hex = hex_encode(secret->data(), secret->size());
  std::string b64 = base64_encode(secret->data(), secret->size());
  std::string raw(reinterpret_cast<const char*>(secret->data()), secret->size());
  for (const std::string& file : {server_.process.log_path(), server_.state + "/keygate.db",
                                  server_.state + "/keygate.db-wal"}) {
    std::string content = read_file(file);
    EXPECT_FALSE(contains(content, hex)) << file;
    EXPECT_FALSE(contains(content, b64)) << file;
    EXPECT_FALSE(contains(content, raw)) << file;
  }

  auto replay = cli->Post(api::kUnlockPath, to_json(req), "application/json");
  ASSERT_TRUE(replay);
  EXPECT_EQ(replay->status, 403);
  EXPECT_TRUE(contains(replay->body, "nonce_invalid")) << replay->body;
  EXPECT_FALSE(contains(replay->body, "wrapped"));
  // A nonce the server never issued.
  req["nonce"] = base64_encode(random_bytes(32));
  auto invented = cli->Post(api::kUnlockPath, to_json(req), "application/json");
  ASSERT_TRUE(invented);
  EXPECT_EQ(invented->status, 403);
}

TEST_F(KeygateTest, ExpiredNonceIsRefused) {
  Server quick = start_server("quick", {"--nonce-ttl", "1"});
  ASSERT_GT(quick.port, 0);
  auto [vol, id] = enrolled_volume(&quick);
  ASSERT_FALSE(id.empty());
  auto keys = X25519KeyPair::generate().value();
  Json::Value req;
  req["volume_id"] = id;
  req["nonce"] = base64_encode(fresh_nonce(quick));
  req["client_public_key"] = base64_encode(keys.public_key.data(), keys.public_key.size());
  req["evidence"] = aws_evidence(emulator_);
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  auto res = api_client(quick)->Post(api::kUnlockPath, to_json(req), "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 403);
  EXPECT_TRUE(contains(res->body, "nonce_invalid")) << res->body;
}

TEST_F(KeygateTest, WrappedSecretAlteredInTransitIsRejected) {
  // A TLS proxy holding the server's own certificate (an attacker who stole
  // it) flips one bit of the sealed secret in every unlock response.
  httplib::SSLServer proxy((server_.state + "/server.pem").c_str(),
                           (server_.state + "/server.key").c_str());
  ASSERT_TRUE(proxy.is_valid());
  const int upstream = server_.port;
  const std::string ca = server_.ca();
  proxy.Post(".*", [upstream, ca](const httplib::Request& req, httplib::Response& res) {
    httplib::SSLClient up("127.0.0.1", upstream);
    up.set_ca_cert_path(ca.c_str());
    up.enable_server_certificate_verification(true);
    auto r = up.Post(req.path.c_str(), req.body, "application/json");
    if (!r) {
      res.status = 502;
      return;
    }
    std::string body = r->body;
    if (req.path == api::kUnlockPath && r->status == 200) {
      auto j = parse_json_object(body).value();
      Bytes sealed = base64_decode(j["wrapped"]["sealed"].asString()).value();
      sealed[sealed.size() / 2] ^= 0x01;
      j["wrapped"]["sealed"] = base64_encode(sealed);
      body = to_json(j);
    }
    res.status = r->status;
    res.set_content(body, "application/json");
  });
  int port = proxy.bind_to_any_port("127.0.0.1");
  ASSERT_GT(port, 0);
  std::thread t([&proxy] { proxy.listen_after_bind(); });
  Server via_proxy;  // same CA and state, the proxy's port
  via_proxy.state = server_.state;
  via_proxy.port = port;

  std::string vol = new_volume_file();
  RunResult enrolled = enroll_format(vol, via_proxy, make_token(server_), emulator_);
  EXPECT_EQ(enrolled.exit_code, 0) << enrolled.err;
  RunResult r = unlock(vol, emulator_);
  EXPECT_EQ(r.exit_code, kExitUntrusted) << r.err;
  EXPECT_TRUE(contains(r.err, "does not authenticate")) << r.err;
  proxy.stop();
  t.join();
}

TEST_F(KeygateTest, ClientPinnedToAnotherCaRefusesToTalk) {
  Server first = start_server("pin-a");
  ASSERT_GT(first.port, 0);
  auto [vol, vol_id] = enrolled_volume(&first);
  ASSERT_FALSE(vol_id.empty());
  const int port = first.port;
  first.process.stop();
  // An impostor with its own CA takes over the address.
  Server impostor = start_server("pin-b", {"--listen", "127.0.0.1:" + std::to_string(port)});
  ASSERT_EQ(impostor.port, port) << read_file(impostor.process.log_path());
  RunResult r = unlock(vol, emulator_);
  EXPECT_EQ(r.exit_code, kExitUntrusted) << r.err;
  EXPECT_TRUE(contains(r.err, "not trusted")) << r.err;
  RunResult audit = run({bin("keygate-server"), "audit", "--state-dir", impostor.state});
  EXPECT_FALSE(contains(audit.out, "unlock")) << "the request reached the impostor";
}

TEST_F(KeygateTest, ServerDownFailsFastWithUnreachableCode) {
  Server doomed = start_server("down");
  ASSERT_GT(doomed.port, 0);
  auto [vol, vol_id] = enrolled_volume(&doomed);
  ASSERT_FALSE(vol_id.empty());
  doomed.process.stop();
  RunResult r = unlock(vol, emulator_);
  EXPECT_EQ(r.exit_code, kExitUnreachable) << r.err;
  EXPECT_TRUE(contains(r.err, "Could not connect") || contains(r.err, "Couldn't connect") ||
              contains(r.err, "Connection refused"))
      << r.err;
  // Fails fast: a refused connection is not retried for the full timeout.
  EXPECT_LT(r.seconds, 3.0);
}

TEST_F(KeygateTest, SecondServerIsUsedWhenFirstIsUntrusted) {
  Server impostor = start_server("impostor");
  ASSERT_GT(impostor.port, 0);
  std::string vol = new_volume_file();
  RunResult e = enroll_format(vol, server_, make_token(server_), emulator_, {impostor.url()});
  ASSERT_EQ(e.exit_code, 0) << e.err;
  RunResult r = unlock(vol, emulator_);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "not trusted")) << r.err;
}

// A TCP listener that never accepts: connections complete in the kernel's
// backlog and then hear nothing, like a hung server.
struct SilentServer {
  int fd = -1;
  int port = 0;
  SilentServer() {
    fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 && listen(fd, 16) == 0) {
      socklen_t len = sizeof(addr);
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
      port = ntohs(addr.sin_port);
    }
  }
  ~SilentServer() { close(fd); }
  std::string url() const { return "https://127.0.0.1:" + std::to_string(port); }
};

TEST_F(KeygateTest, SilentOrKilledFirstServerCostsUnderTwoSeconds) {
  SilentServer silent;
  ASSERT_GT(silent.port, 0);
  std::string vol = new_volume_file();
  RunResult e = enroll_format(vol, server_, make_token(server_), emulator_, {silent.url()});
  ASSERT_EQ(e.exit_code, 0) << e.err;
  RunResult r = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url",
                     emulator_.url(), "--deadline", "120"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "127.0.0.1:" + std::to_string(silent.port))) << r.err;
  EXPECT_LT(r.seconds, 2.0) << r.err;

  // A killed server (nothing listening) is skipped at once as well.
  Server doomed = start_server("killed");
  ASSERT_GT(doomed.port, 0);
  std::string vol2 = new_volume_file();
  ASSERT_EQ(enroll_format(vol2, server_, make_token(server_), emulator_, {doomed.url()}).exit_code,
            0);
  doomed.process.stop();
  RunResult k = run({bin("keygate"), "unlock", vol2, "--verify-only", "--metadata-url",
                     emulator_.url(), "--deadline", "120"});
  EXPECT_EQ(k.exit_code, 0) << k.err;
  EXPECT_LT(k.seconds, 2.0) << k.err;
}

TEST_F(KeygateTest, DeadlineRetriesUntilTheServerComesBack) {
  Server flaky = start_server("flaky");
  ASSERT_GT(flaky.port, 0);
  auto [vol, vol_id] = enrolled_volume(&flaky);
  ASSERT_FALSE(vol_id.empty());
  const int port = flaky.port;
  const std::string state = flaky.state;
  flaky.process.stop();
  std::thread restart([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(2500));
    flaky = start_server("flaky", {"--listen", "127.0.0.1:" + std::to_string(port)}, state);
  });
  RunResult r = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url",
                     emulator_.url(), "--deadline", "30"});
  restart.join();
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "retrying in")) << r.err;
  EXPECT_TRUE(contains(r.err, "round")) << r.err;
}

TEST_F(KeygateTest, DeadlineEndsWhenAllServersRefuseOrTimeRunsOut) {
  auto [vol, id] = enrolled_volume();
  ASSERT_EQ(run({bin("keygate-server"), "volumes", "revoke", id, "--state-dir", server_.state})
                .exit_code,
            0);
  // Refused by every server: no point retrying, whatever the deadline.
  RunResult refused = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url",
                           emulator_.url(), "--deadline", "60"});
  EXPECT_EQ(refused.exit_code, kExitRefused) << refused.err;
  EXPECT_FALSE(contains(refused.err, "retrying")) << refused.err;

  // Unreachable until the deadline: hands over after about the deadline (a
  // last round starts at most a second before it, never earlier).
  Server gone = start_server("gone");
  ASSERT_GT(gone.port, 0);
  auto [vol2, vol2_id] = enrolled_volume(&gone);
  ASSERT_FALSE(vol2_id.empty());
  gone.process.stop();
  RunResult timeout = run({bin("keygate"), "unlock", vol2, "--verify-only", "--metadata-url",
                           emulator_.url(), "--deadline", "3"});
  EXPECT_EQ(timeout.exit_code, kExitUnreachable) << timeout.err;
  EXPECT_TRUE(contains(timeout.err, "deadline")) << timeout.err;
  EXPECT_GE(timeout.seconds, 2.0);
  EXPECT_LT(timeout.seconds, 6.0);
}

TEST_F(KeygateTest, OversizedAndMalformedBodiesGet400AndServerKeepsServing) {
  auto cli = api_client(server_);
  std::string huge(api::kMaxRequestBody + 1024, 'x');
  auto big = cli->Post(api::kUnlockPath, huge, "application/json");
  ASSERT_TRUE(big);
  EXPECT_EQ(big->status, 400);
  EXPECT_TRUE(contains(big->body, "request_too_large")) << big->body;

  for (const std::string& body :
       {std::string("{not json"), std::string("[]"), std::string("{\"volume_id\":5}"),
        std::string("{\"volume_id\":\"../x\",\"nonce\":\"AA==\"}"),
        std::string("{\"volume_id\":\"abc\",\"nonce\":\"!!\",\"client_public_key\":\"\"}"),
        std::string("\x00\x01\x02", 3)}) {
    auto r = api_client(server_)->Post(api::kUnlockPath, body, "application/json");
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 400) << body;
    EXPECT_TRUE(parse_json_object(r->body).is_ok()) << r->body;
    EXPECT_TRUE(contains(r->body, "\"error\""));
  }
  auto reg = api_client(server_)->Post(api::kEnrollRegisterPath, "{}", "application/json");
  ASSERT_TRUE(reg);
  EXPECT_EQ(reg->status, 400);
  // Still serving.
  EXPECT_EQ(fresh_nonce(server_).size(), api::kNonceSize);
  auto [vol, id] = enrolled_volume();
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
}

TEST_F(KeygateTest, RevokedVolumeIsRefused) {
  auto [vol, id] = enrolled_volume();
  ASSERT_EQ(unlock(vol, emulator_).exit_code, 0);
  RunResult revoke =
      run({bin("keygate-server"), "volumes", "revoke", id, "--state-dir", server_.state});
  ASSERT_EQ(revoke.exit_code, 0) << revoke.err;
  RunResult r = unlock(vol, emulator_);
  EXPECT_EQ(r.exit_code, kExitRefused) << r.err;
  EXPECT_TRUE(contains(r.err, "revoked")) << r.err;
  RunResult list = run({bin("keygate-server"), "volumes", "list", "--state-dir", server_.state});
  EXPECT_TRUE(contains(list.out, "revoked"));
}

// Every release is in the audit log before the key leaves: while the log
// cannot be written (here another writer holds the database, as a stuck
// process or a full disk would make it), nothing is released.
TEST_F(KeygateTest, NoKeyIsReleasedWhileTheAuditLogCannotBeWritten) {
  auto [vol, id] = enrolled_volume();
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((server_.state + "/keygate.db").c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "BEGIN EXCLUSIVE", nullptr, nullptr, nullptr), SQLITE_OK);
  // The server waits 5 s for the lock before it gives up on the write.
  RunResult held = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url",
                        emulator_.url(), "--timeout", "20"});
  ASSERT_EQ(sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
  EXPECT_EQ(held.exit_code, kExitUnreachable) << held.err;
  EXPECT_TRUE(contains(held.err, "audit_unavailable")) << held.err;
  EXPECT_FALSE(contains(held.out, "opens keyslot")) << held.out;
  EXPECT_TRUE(contains(read_file(server_.process.log_path()),
                       "not sent, the audit log cannot be written"));

  // Once the log can be written again, the same volume unlocks, on the record.
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  RunResult audit = run({bin("keygate-server"), "audit", "--state-dir", server_.state});
  EXPECT_TRUE(contains(audit.out, "unlock released volume=" + id)) << audit.out;
}

TEST_F(KeygateTest, EnrollmentTokenIsSingleUseAndBoundToItsAccount) {
  std::string token = make_token(server_);
  std::string a = new_volume_file(), b = new_volume_file();
  ASSERT_EQ(enroll_format(a, server_, token, emulator_).exit_code, 0);
  RunResult reuse = enroll_format(b, server_, token, emulator_);
  EXPECT_EQ(reuse.exit_code, kExitRefused) << reuse.err;
  EXPECT_TRUE(contains(reuse.err, "enrollment_token_invalid")) << reuse.err;
  // Nothing was written to the blank device.
  EXPECT_TRUE(unlocker::check_device_blank(b).is_ok());

  std::string other_account = make_token(server_, {"--account", "444455556666"});
  RunResult wrong = enroll_format(b, server_, other_account, emulator_);
  EXPECT_EQ(wrong.exit_code, kExitRefused) << wrong.err;
  EXPECT_TRUE(unlocker::check_device_blank(b).is_ok());
}

TEST_F(KeygateTest, ImageGroupVolumeEnrolledOfflineOpensOnAnyInstanceOfTheImage) {
  Identity builder;
  std::string token = make_token(server_, {"--image-group", "--account", builder.account,
                                           "--region", builder.region, "--image-id",
                                           "ami-0golden000000001"});
  std::string vol = new_volume_file();
  RunResult e = run({bin("keygate"), "enroll", vol, "--format", "--no-recovery", "--no-evidence",
                     "--server", server_.url(), "--ca", server_.ca(), "--enrollment-token-file",
                     token});
  ASSERT_EQ(e.exit_code, 0) << e.err;
  Identity launched;
  launched.image = "ami-0golden000000001";
  launched.instance = "i-0ddddddddddddddd1";
  Emulator emu = start_emulator(launched, dir_ + "/emu");
  EXPECT_EQ(unlock(vol, emu).exit_code, 0);
  Identity other_image = launched;
  other_image.image = "ami-0other0000000001";
  Emulator emu2 = start_emulator(other_image, dir_ + "/emu");
  EXPECT_EQ(unlock(vol, emu2).exit_code, kExitRefused);
}

TEST_F(KeygateTest, FormatRefusesDeviceWithFilesystemAndServerDownLeavesDeviceUntouched) {
  std::string vol = new_volume_file();
  ASSERT_EQ(run({"mke2fs", "-q", "-F", "-t", "ext4", vol}).exit_code, 0);
  std::string before = read_file(vol);
  RunResult r = enroll_format(vol, server_, make_token(server_), emulator_);
  EXPECT_EQ(r.exit_code, kExitVolume) << r.err;
  EXPECT_TRUE(contains(r.err, "not blank")) << r.err;
  EXPECT_EQ(read_file(vol), before);

  // Existing LUKS2 volume, server unreachable: no keyslot or token added.
  std::string luks = new_volume_file();
  std::string pass = dir_ + "/" + unique("pass");
  write_file(pass, "pw");
  ASSERT_EQ(run({"cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf",
                 "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", pass, luks})
                .exit_code,
            0);
  std::string header_before = read_file(luks).substr(0, 1 << 20);
  RunResult down = run({bin("keygate"), "enroll", luks, "--server", "https://127.0.0.1:1", "--ca",
                        server_.ca(), "--enrollment-token-file", make_token(server_),
                        "--metadata-url", emulator_.url(), "--passphrase-file", pass});
  EXPECT_EQ(down.exit_code, kExitUnreachable) << down.err;
  EXPECT_EQ(read_file(luks).substr(0, 1 << 20), header_before);
}

TEST_F(KeygateTest, EncryptInPlaceThenEnrollForImageBuilders) {
  // An ext4 image with data, encrypted in place and enrolled as an
  // image-group volume, the way an image builder would.
  std::string fsroot = dir_ + "/" + unique("fsroot");
  ASSERT_EQ(run({"mkdir", "-p", fsroot}).exit_code, 0);
  write_file(fsroot + "/data.txt", "plaintext that must not survive encryption");
  std::string image = dir_ + "/" + unique("image") + ".img";
  ASSERT_EQ(run({"truncate", "-s", "24M", image}).exit_code, 0);
  ASSERT_EQ(run({"mke2fs", "-q", "-F", "-t", "ext4", "-d", fsroot, image}).exit_code, 0);
  std::string recovery = dir_ + "/" + unique("recovery");
  write_file(recovery, "image recovery passphrase");
  Identity id;
  std::string token = make_token(server_, {"--image-group", "--account", id.account, "--region",
                                           id.region, "--image-id", id.image});
  std::vector<std::string> argv = {bin("keygate"), "encrypt", image, "--recovery-passphrase-file",
                                   recovery, "--no-evidence", "--server", server_.url(), "--ca",
                                   server_.ca(), "--enrollment-token-file", token};
  RunResult r = run(argv);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "100%")) << r.err;  // progress is shown
  EXPECT_FALSE(contains(read_file(image), "plaintext that must not survive")) << "plaintext left";
  EXPECT_EQ(unlock(image, emulator_).exit_code, 0);
  RunResult rec = run({"cryptsetup", "open", "--test-passphrase", "--key-file", recovery, image});
  EXPECT_EQ(rec.exit_code, 0) << rec.err;
  // The recovery keyslot's cost is bounded so small instances can open it.
  RunResult dump = run({"cryptsetup", "luksDump", image});
  EXPECT_TRUE(contains(dump.out, "argon2id")) << dump.out;
  EXPECT_TRUE(contains(dump.out, "Memory:     32768")) << dump.out;

  // Encrypting again is refused; a blank image is not "encrypted".
  RunResult again = run(argv);
  EXPECT_NE(again.exit_code, 0);
  EXPECT_TRUE(contains(again.err, "already")) << again.err;
  std::string blank = new_volume_file();
  argv[2] = blank;
  RunResult empty = run(argv);
  EXPECT_EQ(empty.exit_code, 2) << empty.err;
  EXPECT_TRUE(contains(empty.err, "no filesystem")) << empty.err;
}

TEST_F(KeygateTest, MetadataEmulatorSpeaksImdsV2) {
  httplib::Client cli("127.0.0.1", emulator_.port);
  // IMDSv2 only: no token, no answer.
  auto anon = cli.Get("/latest/dynamic/instance-identity/document");
  ASSERT_TRUE(anon);
  EXPECT_EQ(anon->status, 401);
  auto no_ttl = cli.Put("/latest/api/token", "", "text/plain");
  ASSERT_TRUE(no_ttl);
  EXPECT_EQ(no_ttl->status, 400);
  httplib::Headers fwd = {{"X-aws-ec2-metadata-token-ttl-seconds", "60"},
                          {"X-Forwarded-For", "10.0.0.1"}};
  auto forwarded = cli.Put("/latest/api/token", fwd, "", "text/plain");
  ASSERT_TRUE(forwarded);
  EXPECT_EQ(forwarded->status, 403);
  auto token = cli.Put("/latest/api/token", {{"X-aws-ec2-metadata-token-ttl-seconds", "60"}}, "",
                       "text/plain");
  ASSERT_TRUE(token);
  ASSERT_EQ(token->status, 200);
  auto doc = cli.Get("/latest/dynamic/instance-identity/document",
                     {{"X-aws-ec2-metadata-token", token->body}});
  ASSERT_TRUE(doc);
  EXPECT_EQ(doc->status, 200);
  EXPECT_EQ(doc->body.rfind("{\n  \"accountId\" : \"123456789012\",\n", 0), 0u) << doc->body;
  EXPECT_TRUE(contains(doc->body, "\"region\" : \"us-east-1\""));
  auto bad_token = cli.Get("/latest/meta-data/instance-id", {{"X-aws-ec2-metadata-token", "nope"}});
  ASSERT_TRUE(bad_token);
  EXPECT_EQ(bad_token->status, 401);
}

TEST_F(KeygateTest, EnrollmentByAttestationFollowsTheServersRules) {
  const std::string config = dir_ + "/" + unique("attest") + ".json";
  write_file(config, R"({"enroll_by_attestation": [{"platform": "aws",
      "require": {"account_id": "123456789012", "region": "us-east-1"}}]})");
  Server server = start_server("attest", {"--config", config});
  ASSERT_GT(server.port, 0) << read_file(server.process.log_path());
  auto enroll_without_token = [&](const Emulator& emu) {
    std::string vol = new_volume_file();
    RunResult r = run({bin("keygate"), "enroll", vol, "--format", "--no-recovery", "--server",
                       server.url(), "--ca", server.ca(), "--metadata-url", emu.url()});
    return std::make_pair(vol, r);
  };
  // An instance of the rule's account enrolls with no token, per instance.
  auto [vol, ok] = enroll_without_token(emulator_);
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  RunResult list = run({bin("keygate-server"), "volumes", "list", "--json", "--state-dir", server.state});
  EXPECT_TRUE(contains(list.out, "\"instance_id\" : \"i-0aaaaaaaaaaaaaaa1\"")) << list.out;
  RunResult audit = run({bin("keygate-server"), "audit", "--state-dir", server.state});
  EXPECT_TRUE(contains(audit.out, "by attestation (rule 1)")) << audit.out;
  // Another account is not admitted, and the device stays blank.
  Identity other;
  other.account = "999999999999";
  Emulator stranger = start_emulator(other, dir_ + "/emu");
  auto [blank, refused] = enroll_without_token(stranger);
  EXPECT_EQ(refused.exit_code, kExitRefused) << refused.err;
  EXPECT_TRUE(contains(refused.err, "enrollment_token_invalid")) << refused.err;
  EXPECT_FALSE(unlocker::LuksDevice::open(blank).is_ok());
  // A rule that binds no account is refused at start-up.
  const std::string loose = dir_ + "/" + unique("loose") + ".json";
  write_file(loose, R"({"enroll_by_attestation": [{"platform": "aws", "require": {"region": "us-east-1"}}]})");
  RunResult bad = run({bin("keygate-server"), "serve", "--config", loose, "--state-dir",
                       dir_ + "/" + unique("loose-state"), "--listen", "127.0.0.1:0"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_TRUE(contains(bad.err, "must require 'account_id'")) << bad.err;
  // No token and no evidence is a usage error.
  RunResult usage = run({bin("keygate"), "enroll", new_volume_file(), "--format", "--no-recovery",
                         "--no-evidence", "--server", server.url(), "--ca", server.ca()});
  EXPECT_EQ(usage.exit_code, 2) << usage.err;
  server.process.stop();
}

}  // namespace
}  // namespace keygate::testing
