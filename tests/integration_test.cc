// Enrollment and unlock end to end, and the protocol's defences against a
// client or a network that lies (fixture: keygate_fixture.h).
#include "tests/keygate_fixture.h"

#include <signal.h>
#include <time.h>

namespace keygate::testing {
namespace {

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

// The policy file over a real server: a volume enrolled with a token that
// names a policy unlocks while the policy admits its instance (a value of
// a listed claim, inside its hours) and is refused otherwise; SIGHUP
// reloads the file, a file with an error is refused with its line (on the
// audit trail) and the policy in effect keeps running; a policy taken out
// of the file admits no one.
TEST_F(KeygateTest, PolicyFileConditionsAndReloadOnSighup) {
  const Identity id;  // account 123456789012, region us-east-1
  const std::string file = dir_ + "/" + unique("policy") + ".json";
  time_t now = time(nullptr);
  struct tm utc;
  gmtime_r(&now, &utc);
  char away[32];  // an hour that starts two hours from now: outside it now
  snprintf(away, sizeof away, "%02d:00-%02d:00", (utc.tm_hour + 2) % 24, (utc.tm_hour + 3) % 24);
  auto policies = [&](const std::string& regions, const std::string& later_hours) {
    return str_cat("{\n  \"policies\": {\n    \"web\": {\"platform\": \"aws\",\n      \"require\": {\"account_id\": \"",
                   id.account, "\", \"region\": ", regions, "}},\n    \"later\": {\"platform\": \"aws\",\n",
                   "      \"require\": {\"account_id\": \"", id.account, "\"}",
                   later_hours.empty() ? "" : ", \"hours_utc\": \"" + later_hours + "\"", "}\n  }\n}\n");
  };
  const std::string both = "[\"eu-west-1\", \"us-east-1\"]";
  write_file(file, policies(both, ""));
  server_.process.stop();
  server_ = start_server("policy", {"--policy-file", file});
  ASSERT_GT(server_.port, 0) << read_file(server_.process.log_path());
  auto enrolled_with = [&](const std::string& policy) {
    std::string vol = new_volume_file();
    RunResult r = enroll_format(vol, server_, make_token(server_, {"--policy", policy, "--policy-file", file}),
                                emulator_);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return vol;
  };
  const std::string web = enrolled_with("web");
  const std::string later = enrolled_with("later");
  EXPECT_EQ(unlock(web, emulator_).exit_code, 0);
  EXPECT_EQ(unlock(later, emulator_).exit_code, 0);
  auto audit = [&] { return audit_text(server_); };
  // The audit shows the file loaded with its hash.
  EXPECT_TRUE(contains(audit(), "policy.load ok volume=- peer=local " + file + " sha256 ")) << audit();
  auto reload = [&](const std::string& text, size_t loads) {
    reload_policy_file(server_, file, text, loads);
  };
  // "later" given hours that do not include now: refused.
  reload(policies(both, away), 2);
  RunResult r = unlock(later, emulator_);
  EXPECT_EQ(r.exit_code, kExitRefused) << r.err;
  EXPECT_TRUE(contains(audit(), "policy later: outside its hours (" + std::string(away))) << audit();
  // An error on line 4: refused, named by its line, and "web" still admits.
  reload("{\n  \"policies\": {\n    \"web\": {\"platform\": \"aws\",\n      \"require\": {\"account_id\": 5}}}}\n", 3);
  EXPECT_TRUE(contains(audit(), "policy.load refused volume=- peer=local " + file + ":4: policy 'web': claim 'account_id'"))
      << audit();
  EXPECT_TRUE(contains(read_file(server_.process.log_path()), "policy file refused; the policy in effect stays"));
  EXPECT_EQ(unlock(web, emulator_).exit_code, 0);
  // us-east-1 taken out of "web": the same instance is refused.
  reload(policies("[\"eu-west-1\"]", away), 4);
  r = unlock(web, emulator_);
  EXPECT_EQ(r.exit_code, kExitRefused) << r.err;
  EXPECT_TRUE(contains(audit(), "policy web: region us-east-1 is not allowed")) << audit();
  // Back in: admitted again. Then "web" taken out of the file: deny.
  reload(policies("[\"us-east-1\"]", away), 5);
  EXPECT_EQ(unlock(web, emulator_).exit_code, 0);
  reload(str_cat("{\"policies\": {\"other\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"", id.account,
                 "\"}}}}"),
         6);
  EXPECT_EQ(unlock(web, emulator_).exit_code, kExitRefused);
  EXPECT_TRUE(contains(audit(), "policy web is not in " + file)) << audit();
  EXPECT_EQ(run({bin("keygate-server"), "audit", "verify", "--state-dir", server_.state}).exit_code, 0);

  // A token for a policy the file does not have, or without the file.
  RunResult none = run({bin("keygate-server"), "token", "create", "--state-dir", server_.state, "--policy", "web",
                        "--policy-file", file});
  EXPECT_EQ(none.exit_code, kExitUsage);
  EXPECT_TRUE(contains(none.err, "policy 'web' is not in " + file)) << none.err;
  none = run({bin("keygate-server"), "token", "create", "--state-dir", server_.state, "--policy", "other"});
  EXPECT_EQ(none.exit_code, kExitUsage);
  EXPECT_TRUE(contains(none.err, "--policy-file")) << none.err;
  // A server does not start on a file with an error, and says where.
  write_file(file, "{\n\"policies\": {\n\"x\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"1\"}, \"hours_utc\": 9}}}");
  RunResult start = run({bin("keygate-server"), "serve", "--state-dir", server_.state + "-other", "--listen",
                         "127.0.0.1:0", "--policy-file", file});
  EXPECT_EQ(start.exit_code, kExitUsage);
  EXPECT_TRUE(contains(start.err, file + ":3: policy 'x': 'hours_utc'")) << start.err;
  RunResult check = run({bin("keygate-server"), "policy", "check", file});
  EXPECT_EQ(check.exit_code, kExitUsage);
  EXPECT_TRUE(contains(check.err, file + ":3:")) << check.err;
}

// A token that names a policy enrolls only an instance the policy admits:
// the register is refused (exit 3), no token use is spent and the blank
// device stays blank; an instance the policy admits enrolls with the same
// token.
// days_utc, through a real server: a policy for today admits, one for
// every other day refuses, and a reload moves a volume between them.
// Each claim a policy file can require, through a real server: the
// instance's own value admits it, another value refuses it (named in the
// trail), and its value again admits it.
TEST_F(KeygateTest, EachClaimOfAPolicyAdmitsTheMatchingInstanceAndRefusesAnother) {
  const Identity id;
  const std::string file = dir_ + "/" + unique("claims") + ".json";
  auto policy = [&](const std::string& claim, const std::string& value) {
    std::string require = str_cat("\"account_id\": \"", id.account, "\"");
    if (claim != "account_id")
      require += str_cat(", \"", claim, "\": \"", value, "\"");
    else
      require = str_cat("\"account_id\": \"", value, "\"");
    return str_cat("{\"policies\": {\"p\": {\"platform\": \"aws\", \"require\": {", require,
                   "}}}}\n");
  };
  write_file(file, policy("region", id.region));
  server_.process.stop();
  server_ = start_server("claims", {"--policy-file", file});
  ASSERT_GT(server_.port, 0) << read_file(server_.process.log_path());
  const std::string vol = new_volume_file();
  RunResult enrolled = enroll_format(
      vol, server_, make_token(server_, {"--policy", "p", "--policy-file", file}), emulator_);
  ASSERT_EQ(enrolled.exit_code, 0) << enrolled.err;
  const std::vector<std::tuple<std::string, std::string, std::string>> claims = {
      {"account_id", id.account, "210987654321"},
      {"region", id.region, "eu-west-1"},
      {"availability_zone", id.region + "a", id.region + "b"},
      {"image_id", id.image, "ami-0ccccccccccccccc2"},
      {"instance_id", id.instance, "i-0ddddddddddddddd3"},
      {"instance_type", "t3.micro", "m5.large"}};
  size_t loads = 1;
  for (const auto& [claim, mine, other] : claims) {
    reload_policy_file(server_, file, policy(claim, mine), ++loads);
    RunResult r = unlock(vol, emulator_);
    EXPECT_EQ(r.exit_code, 0) << claim << ": " << r.err;
    reload_policy_file(server_, file, policy(claim, other), ++loads);
    r = unlock(vol, emulator_);
    EXPECT_EQ(r.exit_code, kExitRefused) << claim << ": " << r.err;
    EXPECT_TRUE(
        contains(audit_text(server_), str_cat("policy p: ", claim, " ", mine, " is not allowed")))
        << claim << ": " << audit_text(server_);
  }
  reload_policy_file(server_, file, policy("instance_type", "t3.micro"), ++loads);
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
}

TEST_F(KeygateTest, APolicysDaysOfTheWeekAdmitOnlyOnThoseDays) {
  const Identity id;
  static const char* kDays[] = {"mon", "tue", "wed", "thu", "fri", "sat", "sun"};
  const time_t now = time(nullptr);
  const int today = static_cast<int>(((now / 86400) + 3) % 7);
  // Just before midnight UTC the day may turn during the test: wait it out.
  if (now % 86400 > 86400 - 60) std::this_thread::sleep_for(std::chrono::seconds(61));
  std::string others;
  for (int d = 0; d < 7; ++d) {
    if (d != today) others += str_cat(others.empty() ? "" : ", ", "\"", kDays[d], "\"");
  }
  const std::string file = dir_ + "/" + unique("days") + ".json";
  auto policy = [&](const std::string& days) {
    return str_cat("{\"policies\": {\"days\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"", id.account,
                   "\"}, \"days_utc\": [", days, "]}}}");
  };
  write_file(file, policy(str_cat("\"", kDays[today], "\"")));
  server_.process.stop();
  server_ = start_server("days", {"--policy-file", file});
  ASSERT_GT(server_.port, 0) << read_file(server_.process.log_path());
  const std::string vol = new_volume_file();
  RunResult enrolled = enroll_format(vol, server_, make_token(server_, {"--policy", "days", "--policy-file", file}), emulator_);
  ASSERT_EQ(enrolled.exit_code, 0) << enrolled.err;
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  write_file(file, policy(others));
  ASSERT_EQ(kill(server_.process.pid(), SIGHUP), 0);
  RunResult refused;
  for (int i = 0; i < 50; ++i) {
    refused = unlock(vol, emulator_);
    if (refused.exit_code == kExitRefused) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(refused.exit_code, kExitRefused) << refused.err;
  const std::string trail = run({bin("keygate-server"), "audit", "--state-dir", server_.state, "--limit", "100"}).out;
  EXPECT_TRUE(contains(trail, str_cat("policy days: not on its days (", "")) ) << trail;
  EXPECT_TRUE(contains(trail, str_cat("today ", kDays[today], ")"))) << trail;
}

// max_releases through a real server: the instance gets its count of
// releases in the period, then a refusal; the volume's other instances,
// and a volume of its own, count apart (SQLite, in the release's transaction).
TEST_F(KeygateTest, MaxReleasesRefusesAnInstanceAfterItsCountInThePeriod) {
  const Identity id;
  const std::string file = dir_ + "/" + unique("max") + ".json";
  write_file(file, str_cat(R"({"policies": {"twice": {"platform": "aws", "require": {"account_id": ")", id.account,
                           R"("}, "max_releases": {"count": 2, "period": 3600}}}})"));
  server_.process.stop();
  server_ = start_server("max-releases", {"--policy-file", file});
  ASSERT_GT(server_.port, 0) << read_file(server_.process.log_path());
  auto enrolled = [&] {
    const std::string vol = new_volume_file();
    RunResult r = enroll_format(vol, server_, make_token(server_, {"--policy", "twice", "--policy-file", file}), emulator_);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return vol;
  };
  const std::string vol = enrolled();
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  RunResult third = unlock(vol, emulator_);
  EXPECT_EQ(third.exit_code, kExitRefused) << third.err;
  EXPECT_TRUE(contains(third.err, "policy_denied")) << third.err;
  const std::string trail = run({bin("keygate-server"), "audit", "--state-dir", server_.state, "--limit", "100"}).out;
  EXPECT_TRUE(contains(trail, "policy twice: 2 releases to instance " + id.instance + " within the period already"))
      << trail;
  EXPECT_EQ(unlock(enrolled(), emulator_).exit_code, 0);  // another volume counts apart
  // A restart keeps the count: it is in the store.
  server_.process.stop();
  server_ = start_server("max-releases", {"--policy-file", file, "--listen", "127.0.0.1:" + std::to_string(server_.port)},
                         server_.state);
  ASSERT_GT(server_.port, 0);
  EXPECT_EQ(unlock(vol, emulator_).exit_code, kExitRefused);
  EXPECT_EQ(run({bin("keygate-server"), "audit", "verify", "--state-dir", server_.state}).exit_code, 0);
}

TEST_F(KeygateTest, ATokenForAPolicyEnrollsOnlyInstancesItAdmits) {
  const Identity id;  // region us-east-1
  const std::string file = dir_ + "/" + unique("policy") + ".json";
  write_file(file, str_cat("{\"policies\": {\"eu\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"",
                           id.account, "\", \"region\": [\"eu-west-1\"]}}}}"));
  server_.process.stop();
  server_ = start_server("policy-enroll", {"--policy-file", file});
  ASSERT_GT(server_.port, 0) << read_file(server_.process.log_path());
  const std::string token = make_token(server_, {"--policy", "eu", "--policy-file", file, "--uses", "1"});
  const std::string vol = new_volume_file();
  const std::string before = read_file(vol);
  RunResult r = enroll_format(vol, server_, token, emulator_);
  EXPECT_EQ(r.exit_code, kExitRefused) << r.err;
  EXPECT_EQ(read_file(vol), before);
  RunResult audit = run({bin("keygate-server"), "audit", "--state-dir", server_.state});
  EXPECT_TRUE(contains(audit.out, "enroll.register refused volume=- peer=127.0.0.1 policy eu: region us-east-1 is not allowed"))
      << audit.out;
  Identity eu = id;
  eu.region = "eu-west-1";
  eu.instance = "i-0eeeeeeeeeeeeeee9";
  Emulator emu_eu = start_emulator(eu, dir_ + "/emu");
  RunResult ok = enroll_format(vol, server_, token, emu_eu);  // the token's one use is still there
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_EQ(unlock(vol, emu_eu).exit_code, 0);
}

}  // namespace
}  // namespace keygate::testing
