// Enrollment and unlock end to end, and the protocol's defences against a
// client or a network that lies (fixture: keygate_fixture.h).
#include "tests/keygate_fixture.h"

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


}  // namespace
}  // namespace keygate::testing
