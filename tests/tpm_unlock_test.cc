// TPM-bound volumes end to end: real swtpm instances (socket TCTI on
// 127.0.0.1, random ports), the real keygate-server over TLS, the metadata
// emulator, the real keygate binary and real LUKS2 headers on loop files.
#include <gtest/gtest.h>
#include <httplib.h>
#include <unistd.h>

#include <atomic>
#include <future>
#include <regex>

#include "core/crypto.h"
#include "core/envelope.h"
#include "core/json.h"
#include "core/protocol.h"
#include "harness.h"
#include "unlocker/evidence.h"
#include "unlocker/luks.h"
#include "unlocker/tpm_attest.h"

namespace keygate::testing {
namespace {

constexpr int kExitRefused = 3;
constexpr int kExitVolume = 6;

bool contains(const std::string& s, const std::string& needle) {
  return s.find(needle) != std::string::npos;
}

class TpmUnlockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = make_temp_dir("keygate-tpm-unlock");
    ASSERT_EQ(run({bin("keygate-metadata-emulator"), "init", "--state-dir", dir_ + "/emu"}).exit_code, 0);
    const std::string port_file = dir_ + "/server.port";
    // These tests send one instance's altered quotes by the dozen: the
    // per-instance rate limit is off for them.
    const std::string config = dir_ + "/server.json";
    write_file(config, R"({"rate_limits": {"per_instance": {"per_second": 0, "burst": 1}}})");
    server_ = Background({bin("keygate-server"), "serve", "--state-dir", dir_ + "/server", "--listen",
                          "127.0.0.1:0", "--port-file", port_file, "--aws-trust-dir",
                          dir_ + "/emu/aws-trust", "--config", config},
                         dir_ + "/server.log");
    port_ = wait_for_port_file(port_file, server_);
    ASSERT_GT(port_, 0) << read_file(dir_ + "/server.log");
    emulator_ = Background({bin("keygate-metadata-emulator"), "serve", "--state-dir", dir_ + "/emu",
                            "--listen", "127.0.0.1:0", "--port-file", dir_ + "/emu.port"},
                           dir_ + "/emu.log");
    emu_port_ = wait_for_port_file(dir_ + "/emu.port", emulator_);
    ASSERT_GT(emu_port_, 0);
    tpm_a_ = start_swtpm(dir_ + "/tpm-a");
    ASSERT_GT(tpm_a_.port, 0) << read_file(dir_ + "/tpm-a.log");
  }

  void TearDown() override {
    server_.stop();
    emulator_.stop();
    tpm_a_.process.stop();
    std::string log = read_file(dir_ + "/server.log");
    EXPECT_FALSE(contains(log, "Sanitizer")) << log;
    remove_test_dir(dir_, HasFailure());
  }

  std::string unique(const std::string& name) {
    static std::atomic<int> counter{0};
    return dir_ + "/" + name + "-" + std::to_string(++counter);
  }
  std::string metadata_url() const { return "http://127.0.0.1:" + std::to_string(emu_port_); }

  RunResult enroll(const std::string& vol, std::vector<std::string> extra) {
    RunResult t = run({bin("keygate-server"), "token", "create", "--state-dir", dir_ + "/server"});
    EXPECT_EQ(t.exit_code, 0) << t.err;
    const std::string token = unique("token");
    write_file(token, t.out);
    std::vector<std::string> argv = {bin("keygate"), "enroll", vol, "--format", "--no-recovery",
                                     "--server", "https://127.0.0.1:" + std::to_string(port_),
                                     "--ca", dir_ + "/server/ca.pem", "--enrollment-token-file", token,
                                     "--metadata-url", metadata_url()};
    for (auto& e : extra) argv.push_back(e);
    return run(argv);
  }

  std::string new_volume() {
    std::string vol = unique("vol") + ".img";
    EXPECT_EQ(run({"truncate", "-s", "32M", vol}).exit_code, 0);
    return vol;
  }

  // A volume enrolled with tpm_a_ quoting `pcrs`.
  std::string tpm_volume(std::vector<std::string> extra = {}) {
    std::string vol = new_volume();
    std::vector<std::string> args = {"--tpm", "required", "--tcti", tpm_a_.tcti(), "--tpm-pcrs", "0,7"};
    for (auto& e : extra) args.push_back(e);
    RunResult r = enroll(vol, args);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return vol;
  }

  RunResult unlock(const std::string& vol, const Swtpm& tpm) {
    return run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url", metadata_url(),
                "--tcti", tpm.tcti(), "--timeout", "5"});
  }

  void extend(const Swtpm& t, int pcr) {
    RunResult r = run({"tpm2_pcrextend", "-T", t.tcti(),
                       std::to_string(pcr) + ":sha256=" + hex_encode(random_bytes(32))});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  std::string server_cmd(std::vector<std::string> args) {
    std::vector<std::string> argv = {bin("keygate-server")};
    for (auto& a : args) argv.push_back(a);
    argv.push_back("--state-dir");
    argv.push_back(dir_ + "/server");
    RunResult r = run(argv);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.out;
  }

  std::string audit() { return server_cmd({"audit"}); }

  unlocker::KeygateToken token_of(const std::string& vol) {
    auto dev = unlocker::LuksDevice::open(vol);
    EXPECT_TRUE(dev.is_ok());
    auto found = dev->find_keygate_token();
    EXPECT_TRUE(found.is_ok() && found->has_value());
    return found.value()->second;
  }

  Bytes challenge() {
    httplib::SSLClient cli("127.0.0.1", port_);
    cli.set_ca_cert_path((dir_ + "/server/ca.pem").c_str());
    cli.enable_server_certificate_verification(true);
    auto res = cli.Post(api::kChallengePath, "{}", "application/json");
    EXPECT_TRUE(res && res->status == 200);
    if (!res) return {};
    return base64_decode(parse_json_object(res->body).value()["nonce"].asString()).value();
  }

  // An unlock request straight to the API: AWS evidence plus `tpm` (if not null).
  httplib::Result post_unlock(const std::string& vid, const Bytes& nonce, const X25519KeyPair& keys,
                              const Json::Value& tpm) {
    Json::Value req;
    req["volume_id"] = vid;
    req["nonce"] = base64_encode(nonce);
    req["client_public_key"] = base64_encode(keys.public_key.data(), keys.public_key.size());
    req["evidence"] = unlocker::collect_aws_evidence(metadata_url(), 5000).value();
    if (!tpm.isNull()) req["tpm"] = tpm;
    httplib::SSLClient cli("127.0.0.1", port_);
    cli.set_ca_cert_path((dir_ + "/server/ca.pem").c_str());
    cli.enable_server_certificate_verification(true);
    return cli.Post(api::kUnlockPath, to_json(req), "application/json");
  }

  std::string dir_;
  Background server_, emulator_;
  int port_ = 0, emu_port_ = 0;
  Swtpm tpm_a_;
};

TEST_F(TpmUnlockTest, QuoteBackedUnlockSucceeds) {
  const std::string vol = tpm_volume();
  auto token = token_of(vol);
  ASSERT_TRUE(token.tpm);
  EXPECT_EQ(token.tpm->pcrs, (std::vector<uint32_t>{0, 7}));
  RunResult r = unlock(vol, tpm_a_);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, "opens keyslot")) << r.out;
  std::string list = server_cmd({"volumes", "list", "--json"});
  EXPECT_TRUE(contains(list, "\"ak\"")) << list;
  EXPECT_TRUE(contains(list, "\"7\"")) << list;
}

TEST_F(TpmUnlockTest, ChangedPcrIsRefusedUntilAcceptNextLetsOneBootThrough) {
  const std::string vol = tpm_volume();
  ASSERT_EQ(unlock(vol, tpm_a_).exit_code, 0);
  extend(tpm_a_, 7);
  RunResult refused = unlock(vol, tpm_a_);
  EXPECT_EQ(refused.exit_code, kExitRefused) << refused.err;
  EXPECT_TRUE(contains(refused.err, "policy_denied")) << refused.err;
  EXPECT_TRUE(contains(audit(), "PCR values not accepted: PCR 7")) << audit();

  const std::string vid = token_of(vol).volume_id;
  std::string armed = server_cmd({"volumes", "accept-next", vid, "--ttl", "600"});
  EXPECT_TRUE(contains(armed, "new baseline")) << armed;
  // The changed boot gets through once, and its values become the baseline.
  RunResult accepted = unlock(vol, tpm_a_);
  EXPECT_EQ(accepted.exit_code, 0) << accepted.err;
  EXPECT_TRUE(contains(audit(), "tpm.accept_next ok")) << audit();
  EXPECT_EQ(unlock(vol, tpm_a_).exit_code, 0);  // the new baseline
  // The arm is spent: a second change is refused.
  extend(tpm_a_, 7);
  EXPECT_EQ(unlock(vol, tpm_a_).exit_code, kExitRefused);
  // An allow-listed value is accepted without re-arming.
  auto pcrs = unlocker::TpmAttester(tpm_a_.tcti(), *token_of(vol).tpm);
  ASSERT_TRUE(pcrs.ready().is_ok());
  auto q = pcrs.evidence(random_bytes(32), false);
  ASSERT_TRUE(q.is_ok());
  server_cmd({"volumes", "pcr-allow", vid, "7=" + q.value()["pcrs"]["7"].asString()});
  EXPECT_EQ(unlock(vol, tpm_a_).exit_code, 0);
}

// A policy with pcr_change "approval": a boot whose PCRs changed waits for
// a person, who sees the old and new values; once approved, the new values
// are the volume's too and the next boot with them is unattended.
TEST_F(TpmUnlockTest, AChangedPcrBecomesARequestAndOnceApprovedItsValuesAreAccepted) {
  const std::string policy = unique("policy") + ".json";
  write_file(policy, R"({"policies": {"tpm-fleet": {"platform": "aws", "require": {"account_id": "123456789012"},
    "pcr_change": "approval"}}})");
  server_.stop();
  const std::string port_file = dir_ + "/server-policy.port";
  server_ = Background({bin("keygate-server"), "serve", "--state-dir", dir_ + "/server", "--listen", "127.0.0.1:0",
                        "--port-file", port_file, "--aws-trust-dir", dir_ + "/emu/aws-trust", "--policy-file", policy},
                       dir_ + "/server.log");
  port_ = wait_for_port_file(port_file, server_);
  ASSERT_GT(port_, 0) << read_file(dir_ + "/server.log");
  ASSERT_EQ(run({bin("keygate-server"), "admin", "bootstrap", "--state-dir", dir_ + "/server", "--name", "alice",
                 "--out", dir_ + "/alice", "--server-url", "https://127.0.0.1:" + std::to_string(port_)})
                .exit_code,
            0);
  RunResult bob = run({bin("keygate-server"), "admin", "cert", "issue", "--name", "bob", "--role", "approver",
                       "--out", dir_ + "/bob", "--admin-dir", dir_ + "/alice"});
  ASSERT_EQ(bob.exit_code, 0) << bob.err;
  RunResult token = run({bin("keygate-server"), "admin", "token", "create", "--policy", "tpm-fleet",
                         "--admin-dir", dir_ + "/alice"});
  ASSERT_EQ(token.exit_code, 0) << token.err;
  const std::string token_file = unique("token");
  write_file(token_file, token.out);
  const std::string vol = new_volume();
  RunResult enrolled = run({bin("keygate"), "enroll", vol, "--format", "--no-recovery", "--server",
                            "https://127.0.0.1:" + std::to_string(port_), "--ca", dir_ + "/server/ca.pem",
                            "--enrollment-token-file", token_file, "--metadata-url", metadata_url(), "--tpm",
                            "required", "--tcti", tpm_a_.tcti(), "--tpm-pcrs", "0,7"});
  ASSERT_EQ(enrolled.exit_code, 0) << enrolled.err;
  const std::string vid = token_of(vol).volume_id;
  ASSERT_EQ(unlock(vol, tpm_a_).exit_code, 0);  // unchanged: automatic

  extend(tpm_a_, 7);  // a kernel or firmware update
  auto waiting = std::async(std::launch::async, [&] {
    return run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url", metadata_url(), "--tcti",
                tpm_a_.tcti(), "--timeout", "5", "--deadline", "60"});
  });
  Json::Value request;
  for (int i = 0; i < 200 && request.isNull(); ++i) {
    RunResult listed = run({bin("keygate-server"), "admin", "requests", "--json", "--admin-dir", dir_ + "/bob"});
    auto parsed = parse_json_object(listed.out, 1 << 20);
    if (parsed.is_ok() && !parsed.value()["requests"].empty()) request = parsed.value()["requests"][0];
    if (request.isNull()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_FALSE(request.isNull()) << "no request for the changed PCR";
  EXPECT_EQ(request["volume_id"].asString(), vid);
  EXPECT_EQ(request["mode"].asString(), "pcr-change");
  // The approver sees which PCR changed, what was accepted and what is quoted.
  const Json::Value& pcr7 = request["pcr_changes"]["pcrs"]["7"];
  ASSERT_TRUE(pcr7.isObject()) << to_json(request);
  EXPECT_EQ(pcr7["accepted"].size(), 1u);
  EXPECT_NE(pcr7["quoted"].asString(), pcr7["accepted"][0].asString());
  EXPECT_FALSE(request["pcr_changes"]["pcrs"].isMember("0"));  // unchanged
  RunResult shown = run({bin("keygate-server"), "admin", "request", request["request_id"].asString(), "--admin-dir",
                         dir_ + "/bob"});
  EXPECT_TRUE(contains(shown.out, "PCR 7 (sha256): accepted " + pcr7["accepted"][0].asString() + ", quoted " +
                                      pcr7["quoted"].asString()))
      << shown.out;
  RunResult approved = run({bin("keygate-server"), "admin", "approve", request["request_id"].asString(), "--reason",
                            "kernel 6.1.0-27 rollout", "--admin-dir", dir_ + "/bob"});
  EXPECT_EQ(approved.exit_code, 0) << approved.err;
  RunResult unlocked = waiting.get();
  EXPECT_EQ(unlocked.exit_code, 0) << unlocked.err;
  EXPECT_TRUE(contains(unlocked.err, "waiting for approval: request " + request["request_id"].asString()))
      << unlocked.err;
  EXPECT_TRUE(contains(audit(), "tpm.pcr_allow ok")) << audit();
  // The next boot with these values: unattended.
  RunResult next = unlock(vol, tpm_a_);
  EXPECT_EQ(next.exit_code, 0) << next.err;
  EXPECT_FALSE(contains(next.err, "waiting for approval")) << next.err;
  // Another change asks again.
  extend(tpm_a_, 7);
  RunResult again = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url", metadata_url(), "--tcti",
                         tpm_a_.tcti(), "--timeout", "5", "--deadline", "3"});
  EXPECT_EQ(again.exit_code, 4) << again.err;  // not decided within its deadline
  EXPECT_TRUE(contains(again.err, "waiting for approval")) << again.err;
}

TEST_F(TpmUnlockTest, QuoteFromAnotherTpmIsRefused) {
  const std::string vol = tpm_volume();
  Swtpm other = start_swtpm(dir_ + "/tpm-b");
  ASSERT_GT(other.port, 0);
  RunResult r = unlock(vol, other);
  EXPECT_EQ(r.exit_code, kExitRefused) << r.err;
  EXPECT_TRUE(contains(r.err, "evidence_invalid")) << r.err;
  EXPECT_TRUE(contains(audit(), "signature does not verify")) << audit();
  other.process.stop();
}

TEST_F(TpmUnlockTest, QuoteOverAnotherNonceOrNoneIsRefused) {
  const std::string vol = tpm_volume();
  auto token = token_of(vol);
  unlocker::TpmAttester tpm(tpm_a_.tcti(), *token.tpm);
  auto keys = X25519KeyPair::generate().value();
  const Bytes pub(keys.public_key.begin(), keys.public_key.end());
  // Quoted for one challenge, sent with the next.
  const Bytes first = challenge();
  auto quote = tpm.evidence(binding_value(first, pub, token.volume_id), false);
  ASSERT_TRUE(quote.is_ok()) << quote.status().message();
  auto res = post_unlock(token.volume_id, challenge(), keys, quote.value());
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 403);
  EXPECT_TRUE(contains(res->body, "evidence_invalid")) << res->body;
  EXPECT_TRUE(contains(audit(), "qualifying data")) << audit();
  // No quote at all.
  res = post_unlock(token.volume_id, challenge(), keys, Json::Value());
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 403);
  EXPECT_TRUE(contains(res->body, "tpm_required")) << res->body;
  // The right nonce works through the same path.
  const Bytes good = challenge();
  quote = tpm.evidence(binding_value(good, pub, token.volume_id), false);
  ASSERT_TRUE(quote.is_ok());
  res = post_unlock(token.volume_id, good, keys, quote.value());
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
}

TEST_F(TpmUnlockTest, TruncatedOrFlippedAttestAndSignatureAreRefused) {
  const std::string vol = tpm_volume();
  auto token = token_of(vol);
  unlocker::TpmAttester tpm(tpm_a_.tcti(), *token.tpm);
  auto keys = X25519KeyPair::generate().value();
  const Bytes pub(keys.public_key.begin(), keys.public_key.end());
  int sent = 0;
  for (const char* field : {"attest", "signature"}) {
    const Bytes nonce0 = challenge();
    auto quote = tpm.evidence(binding_value(nonce0, pub, token.volume_id), false);
    ASSERT_TRUE(quote.is_ok());
    const Bytes original = base64_decode(quote.value()[field].asString()).value();
    std::vector<Bytes> variants = {Bytes{}, Bytes(original.begin(), original.begin() + 1),
                                   Bytes(original.begin(), original.end() - 1)};
    for (size_t i = 0; i < original.size(); i += 7) {
      Bytes flipped = original;
      flipped[i] ^= 0x01;
      variants.push_back(flipped);
    }
    bool first = true;
    for (const Bytes& v : variants) {
      // Each request needs its own challenge; the quote stays bound to the
      // first, which matters only for the unaltered control below.
      Json::Value altered = quote.value();
      altered[field] = base64_encode(v);
      auto res = post_unlock(token.volume_id, first ? nonce0 : challenge(), keys, altered);
      first = false;
      ASSERT_TRUE(res) << "server stopped answering";
      EXPECT_TRUE(res->status == 400 || res->status == 403) << field << ": " << res->status;
      EXPECT_FALSE(contains(res->body, "wrapped"));
      ++sent;
    }
  }
  EXPECT_GT(sent, 20);
  EXPECT_EQ(unlock(vol, tpm_a_).exit_code, 0);  // still serving, genuine quotes still work
}

TEST_F(TpmUnlockTest, TwoFactorVolumeNeedsBothTheServerAndTheTpm) {
  const std::string vol = tpm_volume({"--tpm-seal"});
  auto token = token_of(vol);
  ASSERT_TRUE(token.tpm && !token.tpm->sealed.empty());
  RunResult both = unlock(vol, tpm_a_);
  ASSERT_EQ(both.exit_code, 0) << both.err;

  // The server's share alone (as released over the API) opens nothing.
  unlocker::TpmAttester tpm(tpm_a_.tcti(), *token.tpm);
  auto keys = X25519KeyPair::generate().value();
  const Bytes pub(keys.public_key.begin(), keys.public_key.end());
  const Bytes nonce = challenge();
  auto quote = tpm.evidence(binding_value(nonce, pub, token.volume_id), false);
  ASSERT_TRUE(quote.is_ok());
  auto res = post_unlock(token.volume_id, nonce, keys, quote.value());
  ASSERT_TRUE(res && res->status == 200);
  auto wrapped = WrappedSecret::from_json(parse_json_object(res->body).value()["wrapped"]);
  ASSERT_TRUE(wrapped.is_ok());
  auto server_share = unwrap_secret(wrapped.value(), keys, token.volume_id, nonce);
  ASSERT_TRUE(server_share.is_ok());
  auto dev = unlocker::LuksDevice::open(vol);
  ASSERT_TRUE(dev.is_ok());
  EXPECT_EQ(dev->activate("", token.keyslot, server_share.value()).status().kind(), ErrorKind::kRefused);
  // The TPM's share alone opens nothing either.
  auto tpm_share = tpm.unseal_share();
  ASSERT_TRUE(tpm_share.is_ok()) << tpm_share.status().message();
  EXPECT_EQ(dev->activate("", token.keyslot, tpm_share.value()).status().kind(), ErrorKind::kRefused);
  // Together they do (the control).
  auto combined = unlocker::combine_shares(server_share.value(), tpm_share.value());
  EXPECT_TRUE(dev->activate("", token.keyslot, combined.value()).is_ok());

  // With the server refusing (revoked), the TPM cannot open the volume.
  server_cmd({"volumes", "revoke", token.volume_id});
  EXPECT_EQ(unlock(vol, tpm_a_).exit_code, kExitRefused);
}

TEST_F(TpmUnlockTest, NoTpmFallsBackOrRefusesClearly) {
  const std::string no_tpm = "device:/dev/keygate-no-such-tpm";
  // auto: enrolled without a TPM binding, unlocks without one.
  std::string plain = new_volume();
  RunResult r = enroll(plain, {"--tpm", "auto", "--tcti", no_tpm});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "no TPM used")) << r.err;
  EXPECT_FALSE(token_of(plain).tpm);
  RunResult u = run({bin("keygate"), "unlock", plain, "--verify-only", "--metadata-url",
                     metadata_url(), "--tcti", no_tpm});
  EXPECT_EQ(u.exit_code, 0) << u.err;
  // required: refused before anything is written.
  std::string blank = new_volume();
  r = enroll(blank, {"--tpm", "required", "--tcti", no_tpm});
  EXPECT_EQ(r.exit_code, kExitVolume) << r.err;
  EXPECT_TRUE(contains(r.err, "no TPM")) << r.err;
  EXPECT_FALSE(unlocker::LuksDevice::open(blank).is_ok());  // still blank
  // A TPM-bound volume on a machine without its TPM: a clear refusal.
  const std::string vol = tpm_volume();
  u = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url", metadata_url(),
           "--tcti", no_tpm});
  EXPECT_EQ(u.exit_code, kExitRefused) << u.err;
  EXPECT_TRUE(contains(u.err, "bound to a TPM, but none is available")) << u.err;
}

}  // namespace
}  // namespace keygate::testing
