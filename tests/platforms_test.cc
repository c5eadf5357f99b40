// GCP and Azure end to end: the real keygate-server over TLS, the metadata
// emulator playing each cloud (tokens and documents signed the way Google and
// Azure sign them, with test keys), the real keygate binary detecting the
// platform, and real LUKS2 headers on loop files.
#include <gtest/gtest.h>
#include <httplib.h>
#include <unistd.h>

#include <atomic>
#include <regex>

#include "core/crypto.h"
#include "core/envelope.h"
#include "core/json.h"
#include "core/protocol.h"
#include "harness.h"
#include "unlocker/evidence.h"

namespace keygate::testing {
namespace {

constexpr int kExitRefused = 3;
constexpr int kExitUnreachable = 4;

bool contains(const std::string& s, const std::string& needle) {
  return s.find(needle) != std::string::npos;
}

struct Cloud {
  const char* platform;
  const char* account_claim;                       // policy claim
  std::vector<std::string> other_account_args;     // emulator args for another account
  const char* stale_reason;                        // in the audit log
  const char* replay_reason;
};

void PrintTo(const Cloud& c, std::ostream* os) { *os << c.platform; }

const Cloud kGcp{"gcp", "project_id", {"--project-id", "someone-elses-project"}, "issued", "audience"};
const Cloud kAzure{"azure", "subscription_id",
                   {"--subscription-id", "00000000-1111-2222-3333-444444444444"}, "created", "nonce"};

class PlatformTest : public ::testing::TestWithParam<Cloud> {
 protected:
  static void SetUpTestSuite() {
    dir_ = make_temp_dir("keygate-platforms");
    for (const char* state : {"/emu", "/emu-untrusted"}) {
      RunResult init = run({bin("keygate-metadata-emulator"), "init", "--state-dir", dir_ + state});
      if (init.exit_code != 0) setup_error_ = "emulator init failed: " + init.err;
    }
  }
  static void TearDownTestSuite() {
    remove_test_dir(dir_, ::testing::UnitTest::GetInstance()->failed_test_count() > 0);
  }

  void SetUp() override {
    ASSERT_EQ(setup_error_, "");
    state_ = dir_ + "/" + unique("server");
    const std::string port_file = state_ + ".port";
    server_ = Background({bin("keygate-server"), "serve", "--state-dir", state_, "--listen",
                          "127.0.0.1:0", "--port-file", port_file, "--gcp-jwks",
                          dir_ + "/emu/gcp-trust/jwks.json", "--azure-trust-dir",
                          dir_ + "/emu/azure-trust"},
                         state_ + ".log");
    port_ = wait_for_port_file(port_file, server_);
    ASSERT_GT(port_, 0) << read_file(state_ + ".log");
    emulator_ = start_emulator({});
    ASSERT_GT(emulator_port_, 0);
  }

  void TearDown() override {
    server_.stop();
    emulator_.stop();
    std::string log = read_file(state_ + ".log");
    EXPECT_FALSE(contains(log, "Sanitizer")) << log;
  }

  static std::string unique(const std::string& name) {
    static std::atomic<int> counter{0};
    return name + "-" + std::to_string(++counter);
  }

  // Starts an emulator for this test's cloud; sets emulator_port_.
  Background start_emulator(std::vector<std::string> extra, const std::string& state = "/emu") {
    const std::string port_file = dir_ + "/" + unique("emu") + ".port";
    std::vector<std::string> argv = {bin("keygate-metadata-emulator"), "serve", "--state-dir",
                                     dir_ + state, "--platform", GetParam().platform, "--listen",
                                     "127.0.0.1:0", "--port-file", port_file};
    for (auto& e : extra) argv.push_back(e);
    Background b(argv, port_file + ".log");
    emulator_port_ = wait_for_port_file(port_file, b);
    return b;
  }

  std::string metadata_url(int port) const { return "http://127.0.0.1:" + std::to_string(port); }
  std::string server_url() const { return "https://127.0.0.1:" + std::to_string(port_); }

  // Enrolls a fresh volume through platform detection; returns its path.
  std::string enrolled_volume() {
    RunResult t = run({bin("keygate-server"), "token", "create", "--state-dir", state_,
                       "--platform", GetParam().platform});
    EXPECT_EQ(t.exit_code, 0) << t.err;
    const std::string token = dir_ + "/" + unique("token");
    write_file(token, t.out);
    const std::string vol = dir_ + "/" + unique("vol") + ".img";
    EXPECT_EQ(run({"truncate", "-s", "32M", vol}).exit_code, 0);
    RunResult r = run({bin("keygate"), "enroll", vol, "--format", "--no-recovery", "--server",
                       server_url(), "--ca", state_ + "/ca.pem", "--enrollment-token-file", token,
                       "--metadata-url", metadata_url(emulator_port_)});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(contains(r.err, std::string("platform: ") + GetParam().platform)) << r.err;
    return vol;
  }

  RunResult unlock(const std::string& vol, int metadata_port, std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {bin("keygate"), "unlock", vol, "--verify-only",
                                     "--metadata-url", metadata_url(metadata_port), "--timeout", "5"};
    for (auto& e : extra) argv.push_back(e);
    return run(argv);
  }

  std::string audit() {
    return run({bin("keygate-server"), "audit", "--state-dir", state_}).out;
  }

  std::string volume_id(const std::string& vol) {
    RunResult status = run({bin("keygate"), "status", vol, "--json"});
    auto j = parse_json_object(status.out);
    return j.is_ok() ? j.value()["keygate"]["volume_id"].asString() : "";
  }

  // POSTs an unlock for `vid` with `evidence` and a fresh challenge.
  httplib::Result post_unlock(const std::string& vid, const Json::Value& evidence,
                              const X25519KeyPair& keys, const Bytes& nonce) {
    httplib::SSLClient cli("127.0.0.1", port_);
    cli.set_ca_cert_path((state_ + "/ca.pem").c_str());
    cli.enable_server_certificate_verification(true);
    Json::Value req;
    req["volume_id"] = vid;
    req["nonce"] = base64_encode(nonce);
    req["client_public_key"] = base64_encode(keys.public_key.data(), keys.public_key.size());
    req["evidence"] = evidence;
    return cli.Post(api::kUnlockPath, to_json(req), "application/json");
  }

  Bytes challenge() {
    httplib::SSLClient cli("127.0.0.1", port_);
    cli.set_ca_cert_path((state_ + "/ca.pem").c_str());
    cli.enable_server_certificate_verification(true);
    auto res = cli.Post(api::kChallengePath, "{}", "application/json");
    EXPECT_TRUE(res && res->status == 200);
    if (!res) return {};
    return base64_decode(parse_json_object(res->body).value()["nonce"].asString()).value();
  }

  Result<Json::Value> evidence_for(const Bytes& binding) {
    const std::string url = metadata_url(emulator_port_);
    return std::string(GetParam().platform) == "gcp"
               ? unlocker::collect_gcp_evidence(url, binding, 5000)
               : unlocker::collect_azure_evidence(url, binding, 5000);
  }

  static std::string dir_;
  static std::string setup_error_;
  std::string state_;
  int port_ = 0;
  Background server_;
  Background emulator_;
  int emulator_port_ = 0;
};

std::string PlatformTest::dir_;
std::string PlatformTest::setup_error_;

TEST_P(PlatformTest, EnrollThenUnlockSucceeds) {
  const std::string vol = enrolled_volume();
  RunResult r = unlock(vol, emulator_port_);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, "opens keyslot")) << r.out;
  // Configured instead of detected, too.
  EXPECT_EQ(unlock(vol, emulator_port_, {"--platform", GetParam().platform}).exit_code, 0);
  RunResult list = run({bin("keygate-server"), "volumes", "list", "--state-dir", state_});
  EXPECT_TRUE(contains(list.out, GetParam().account_claim)) << list.out;
  EXPECT_TRUE(contains(audit(), std::string("released")));
}

TEST_P(PlatformTest, AnotherProjectOrSubscriptionIsRefused) {
  const std::string vol = enrolled_volume();
  Background other = start_emulator(GetParam().other_account_args);
  RunResult r = unlock(vol, emulator_port_);
  EXPECT_EQ(r.exit_code, kExitRefused) << r.err;
  EXPECT_TRUE(contains(r.err, "policy_denied")) << r.err;
  EXPECT_FALSE(contains(r.out, "opens keyslot"));
  EXPECT_TRUE(contains(audit(), std::string(GetParam().account_claim) + " mismatch")) << audit();
}

TEST_P(PlatformTest, StaleEvidenceIsRefused) {
  const std::string vol = enrolled_volume();
  Background stale = start_emulator({"--clock-offset", "-1000"});
  RunResult r = unlock(vol, emulator_port_);
  EXPECT_EQ(r.exit_code, kExitRefused) << r.err;
  EXPECT_TRUE(contains(r.err, "evidence_invalid")) << r.err;
  EXPECT_TRUE(contains(audit(), GetParam().stale_reason)) << audit();
}

TEST_P(PlatformTest, EvidenceBoundToAnotherChallengeIsRefused) {
  const std::string vol = enrolled_volume();
  const std::string vid = volume_id(vol);
  ASSERT_FALSE(vid.empty());
  auto keys = X25519KeyPair::generate().value();
  const Bytes client_public(keys.public_key.begin(), keys.public_key.end());
  // Evidence captured for one challenge, replayed with the next one.
  const Bytes first = challenge();
  auto captured = evidence_for(binding_value(first, client_public, vid));
  ASSERT_TRUE(captured.is_ok()) << captured.status().message();
  const Bytes second = challenge();
  auto res = post_unlock(vid, captured.value(), keys, second);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 403);
  EXPECT_TRUE(contains(res->body, "evidence_invalid")) << res->body;
  EXPECT_TRUE(contains(audit(), GetParam().replay_reason)) << audit();
  // Bound to the right challenge, the same path releases the key.
  const Bytes third = challenge();
  auto good = evidence_for(binding_value(third, client_public, vid));
  ASSERT_TRUE(good.is_ok());
  res = post_unlock(vid, good.value(), keys, third);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
}

TEST_P(PlatformTest, SignatureOutsideTheTrustStoreIsRefused) {
  const std::string vol = enrolled_volume();
  // Same instance, signed with keys the server does not trust.
  Background forger = start_emulator({}, "/emu-untrusted");
  RunResult r = unlock(vol, emulator_port_);
  EXPECT_EQ(r.exit_code, kExitRefused) << r.err;
  EXPECT_TRUE(contains(r.err, "evidence_invalid")) << r.err;
}

TEST_P(PlatformTest, TruncatedAndGarbageEvidenceIsRefused) {
  const std::string vol = enrolled_volume();
  const std::string vid = volume_id(vol);
  auto keys = X25519KeyPair::generate().value();
  const Bytes client_public(keys.public_key.begin(), keys.public_key.end());
  const Bytes nonce = challenge();
  auto good = evidence_for(binding_value(nonce, client_public, vid));
  ASSERT_TRUE(good.is_ok());
  const bool gcp = std::string(GetParam().platform) == "gcp";
  Json::Value& field = gcp ? good.value()["gcp"]["identity_token"] : good.value()["azure"]["signature"];
  const std::string text = field.asString();
  std::vector<Json::Value> bad;
  for (size_t len : {size_t{0}, size_t{4}, text.size() / 2, text.size() - 4}) {
    Json::Value e = good.value();
    (gcp ? e["gcp"]["identity_token"] : e["azure"]["signature"]) = text.substr(0, len);
    bad.push_back(e);
  }
  Json::Value garbage = good.value();
  (gcp ? garbage["gcp"]["identity_token"] : garbage["azure"]["signature"]) = "!!not evidence!!";
  bad.push_back(garbage);
  Json::Value wrong_type = good.value();
  (gcp ? wrong_type["gcp"]["identity_token"] : wrong_type["azure"]["signature"]) = 42;
  bad.push_back(wrong_type);
  Json::Value two;
  two["gcp"] = Json::Value(Json::objectValue);
  two["azure"] = Json::Value(Json::objectValue);
  bad.push_back(two);
  for (const Json::Value& e : bad) {
    auto res = post_unlock(vid, e, keys, challenge());
    ASSERT_TRUE(res) << "server stopped answering";
    EXPECT_TRUE(res->status == 400 || res->status == 403) << res->status << " " << res->body;
    auto body = parse_json_object(res->body);
    ASSERT_TRUE(body.is_ok()) << res->body;
    EXPECT_FALSE(body.value()["error"]["message"].asString().empty());
  }
  // Still serving, and the genuine evidence works.
  const Bytes fresh = challenge();
  auto ok = evidence_for(binding_value(fresh, client_public, vid));
  ASSERT_TRUE(ok.is_ok());
  auto res = post_unlock(vid, ok.value(), keys, fresh);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
}

// GCP's token and Azure's document are signed over this request's binding,
// so they prove a live instance: a rule naming the project or subscription
// enrolls its instances with no token, per instance, and no other's.
TEST_P(PlatformTest, EnrollsByAttestationUnderARuleAndNoOtherAccount) {
  const Cloud& cloud = GetParam();
  const std::string account = std::string(cloud.platform) == "gcp"
                                  ? "keygate-test-project"
                                  : "5f130ffc-0a3e-4795-b691-4f56a12a5547";  // the emulator's
  const std::string config = dir_ + "/" + unique("rules") + ".json";
  write_file(config, std::string(R"({"enroll_by_attestation": [{"platform": ")") + cloud.platform +
                         R"(", "require": {")" + cloud.account_claim + R"(": ")" + account + R"("}}]})");
  const std::string state = dir_ + "/" + unique("attest-server");
  Background server({bin("keygate-server"), "serve", "--state-dir", state, "--listen", "127.0.0.1:0",
                     "--port-file", state + ".port", "--config", config, "--gcp-jwks",
                     dir_ + "/emu/gcp-trust/jwks.json", "--azure-trust-dir", dir_ + "/emu/azure-trust"},
                    state + ".log");
  const int port = wait_for_port_file(state + ".port", server);
  ASSERT_GT(port, 0) << read_file(state + ".log");
  const std::string url = "https://127.0.0.1:" + std::to_string(port);
  auto enroll_without_token = [&](int metadata_port) {
    const std::string vol = dir_ + "/" + unique("vol") + ".img";
    EXPECT_EQ(run({"truncate", "-s", "32M", vol}).exit_code, 0);
    RunResult r = run({bin("keygate"), "enroll", vol, "--format", "--no-recovery", "--server", url,
                       "--ca", state + "/ca.pem", "--metadata-url", metadata_url(metadata_port)});
    return std::make_pair(vol, r);
  };
  auto [vol, ok] = enroll_without_token(emulator_port_);
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_EQ(unlock(vol, emulator_port_).exit_code, 0);
  RunResult audit = run({bin("keygate-server"), "audit", "--state-dir", state});
  EXPECT_TRUE(contains(audit.out, "by attestation (rule 1)")) << audit.out;
  // An instance of another project or subscription is not admitted.
  Background other = start_emulator(cloud.other_account_args);
  auto [blank, refused] = enroll_without_token(emulator_port_);
  EXPECT_EQ(refused.exit_code, kExitRefused) << refused.err;
  EXPECT_TRUE(contains(refused.err, "enrollment_token_invalid")) << refused.err;
  other.stop();
  server.stop();
}

TEST_P(PlatformTest, WrongPlatformSettingFailsClearly) {
  const std::string vol = enrolled_volume();
  const char* wrong = std::string(GetParam().platform) == "gcp" ? "azure" : "gcp";
  RunResult r = unlock(vol, emulator_port_, {"--platform", wrong});
  EXPECT_EQ(r.exit_code, kExitUnreachable) << r.err;
  RunResult aws = unlock(vol, emulator_port_, {"--platform", "aws"});
  EXPECT_EQ(aws.exit_code, kExitUnreachable) << aws.err;
  EXPECT_TRUE(contains(aws.err, "AWS metadata token")) << aws.err;
}

INSTANTIATE_TEST_SUITE_P(Clouds, PlatformTest, ::testing::Values(kGcp, kAzure),
                         [](const ::testing::TestParamInfo<Cloud>& p) {
                           return std::string(p.param.platform);
                         });

}  // namespace
}  // namespace keygate::testing
