// The TPM client against real software TPMs (swtpm, socket interface on
// 127.0.0.1), checked with the server's own quote verifier.
#include <gtest/gtest.h>

#include <atomic>

#include "core/crypto.h"
#include "harness.h"
#include "tpm/tpm2_format.h"
#include "tpm/tpm_client.h"

namespace keygate::testing {
namespace {

class TpmClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = make_temp_dir("keygate-tpm");
    tpm_a_ = start_swtpm(dir_ + "/a");
    ASSERT_GT(tpm_a_.port, 0) << read_file(dir_ + "/a.log");
  }
  void TearDown() override {
    tpm_a_.process.stop();
    remove_test_dir(dir_, HasFailure());
  }

  std::unique_ptr<tpm::Tpm> open(const Swtpm& t) {
    auto tpm = tpm::Tpm::open(t.tcti());
    EXPECT_TRUE(tpm.is_ok()) << tpm.status().message();
    return tpm.is_ok() ? std::move(tpm).value() : nullptr;
  }

  void extend(const Swtpm& t, int pcr) {
    RunResult r = run({"tpm2_pcrextend", "-T", t.tcti(),
                       std::to_string(pcr) + ":sha256=" + hex_encode(random_bytes(32))});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  static tpm::QuoteCheck check(const tpm::Quote& q, const Bytes& qd, std::vector<uint32_t> pcrs) {
    tpm::QuoteCheck c;
    c.qualifying_data = qd;
    c.selection = {tpm::kAlgSha256, std::move(pcrs)};
    c.pcr_values = q.pcr_values;
    return c;
  }

  std::string dir_;
  Swtpm tpm_a_;
};

TEST_F(TpmClientTest, QuoteVerifiesWithTheServersVerifier) {
  auto tpm = open(tpm_a_);
  ASSERT_TRUE(tpm);
  auto ak_bytes = tpm->attestation_key();
  ASSERT_TRUE(ak_bytes.is_ok()) << ak_bytes.status().message();
  auto ak = tpm::parse_public(ak_bytes.value());
  ASSERT_TRUE(ak.is_ok()) << ak.status().message();
  EXPECT_EQ(ak->type, tpm::kAlgEcc);
  EXPECT_TRUE(ak->restricted_signing());
  const Bytes qd = random_bytes(32);
  auto q = tpm->quote(tpm::kAlgSha256, {0, 4, 7}, qd);
  ASSERT_TRUE(q.is_ok()) << q.status().message();
  EXPECT_EQ(q->pcr_values.size(), 3u);
  // All 24 take more than one PCR_Read (at most eight digests each).
  std::vector<uint32_t> all;
  for (uint32_t i = 0; i < 24; ++i) all.push_back(i);
  auto every = tpm->read_pcrs(tpm::kAlgSha256, all);
  ASSERT_TRUE(every.is_ok()) << every.status().message();
  EXPECT_EQ(every->size(), 24u);
  EXPECT_EQ(every->at(7), q->pcr_values.at(7));
  EXPECT_TRUE(tpm::verify_quote(q->attest, q->signature, ak.value(), check(q.value(), qd, {0, 4, 7})).is_ok());
  // Another nonce is refused.
  EXPECT_EQ(tpm::verify_quote(q->attest, q->signature, ak.value(),
                              check(q.value(), random_bytes(32), {0, 4, 7})).status().kind(),
            ErrorKind::kRefused);
  // The same key on every open: nothing is stored, the template decides.
  tpm.reset();
  auto again = open(tpm_a_);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->attestation_key().value(), ak_bytes.value());
}

TEST_F(TpmClientTest, ExtendedPcrShowsInTheQuote) {
  auto tpm = open(tpm_a_);
  ASSERT_TRUE(tpm);
  auto before = tpm->quote(tpm::kAlgSha256, {7}, random_bytes(32));
  ASSERT_TRUE(before.is_ok());
  extend(tpm_a_, 7);
  auto after = tpm->quote(tpm::kAlgSha256, {7}, random_bytes(32));
  ASSERT_TRUE(after.is_ok());
  EXPECT_NE(before->pcr_values.at(7), after->pcr_values.at(7));
}

TEST_F(TpmClientTest, AnotherTpmHasAnotherKey) {
  Swtpm tpm_b = start_swtpm(dir_ + "/b");
  ASSERT_GT(tpm_b.port, 0);
  auto a = open(tpm_a_);
  auto b = open(tpm_b);
  ASSERT_TRUE(a && b);
  auto ak_a = tpm::parse_public(a->attestation_key().value()).value();
  auto ak_b = b->attestation_key();
  ASSERT_TRUE(ak_b.is_ok());
  EXPECT_NE(ak_b.value(), a->attestation_key().value());
  const Bytes qd = random_bytes(32);
  auto q = b->quote(tpm::kAlgSha256, {7}, qd);
  ASSERT_TRUE(q.is_ok());
  EXPECT_EQ(tpm::verify_quote(q->attest, q->signature, ak_a, check(q.value(), qd, {7})).status().kind(),
            ErrorKind::kIntegrity);
  tpm_b.process.stop();
}

TEST_F(TpmClientTest, SealedSecretNeedsThisTpmAndTheSamePcrs) {
  Swtpm tpm_b = start_swtpm(dir_ + "/b");
  ASSERT_GT(tpm_b.port, 0);
  auto a = open(tpm_a_);
  ASSERT_TRUE(a);
  auto secret = SecretBuffer::random(32);
  ASSERT_TRUE(secret.is_ok());
  auto blob = a->seal(secret.value(), tpm::kAlgSha256, {7});
  ASSERT_TRUE(blob.is_ok()) << blob.status().message();
  auto opened = a->unseal(blob.value(), tpm::kAlgSha256, {7});
  ASSERT_TRUE(opened.is_ok()) << opened.status().message();
  ASSERT_EQ(opened->size(), 32u);
  EXPECT_EQ(memcmp(opened->data(), secret->data(), 32), 0);
  // Another TPM cannot load it.
  auto b = open(tpm_b);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->unseal(blob.value(), tpm::kAlgSha256, {7}).status().kind(), ErrorKind::kRefused);
  // A changed PCR refuses the policy.
  extend(tpm_a_, 7);
  EXPECT_EQ(a->unseal(blob.value(), tpm::kAlgSha256, {7}).status().kind(), ErrorKind::kRefused);
  // Garbage is refused without reaching the TPM.
  EXPECT_EQ(a->unseal(Bytes(10, 1), tpm::kAlgSha256, {7}).status().kind(), ErrorKind::kInvalidArgument);
  tpm_b.process.stop();
}

TEST_F(TpmClientTest, ProvidersPersistentRsaKeyQuotesToo) {
  // A provider-style attestation key: RSA-2048, RSASSA-SHA256, restricted,
  // made and persisted with tpm2-tools (as GCE pre-provisions one).
  const std::string ctx = dir_ + "/ak.ctx";
  RunResult made = run({"tpm2_createprimary", "-T", tpm_a_.tcti(), "-C", "e", "-G",
                        "rsa2048:rsassa-sha256:null", "-a",
                        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign",
                        "-c", ctx});
  ASSERT_EQ(made.exit_code, 0) << made.err;
  RunResult persisted = run({"tpm2_evictcontrol", "-T", tpm_a_.tcti(), "-C", "o", "-c", ctx, "0x81010002"});
  ASSERT_EQ(persisted.exit_code, 0) << persisted.err;
  auto tpm = open(tpm_a_);
  ASSERT_TRUE(tpm);
  auto ak_bytes = tpm->attestation_key(0x81010002);
  ASSERT_TRUE(ak_bytes.is_ok()) << ak_bytes.status().message();
  auto ak = tpm::parse_public(ak_bytes.value());
  ASSERT_TRUE(ak.is_ok());
  EXPECT_EQ(ak->type, tpm::kAlgRsa);
  const Bytes qd = random_bytes(32);
  auto q = tpm->quote(tpm::kAlgSha256, {0, 7}, qd);
  ASSERT_TRUE(q.is_ok()) << q.status().message();
  auto sig = tpm::parse_signature(q->signature);
  ASSERT_TRUE(sig.is_ok());
  EXPECT_EQ(sig->sig_alg, tpm::kAlgRsassa);
  EXPECT_TRUE(tpm::verify_quote(q->attest, q->signature, ak.value(), check(q.value(), qd, {0, 7})).is_ok());
  // No key at another handle.
  auto other = open(tpm_a_);
  EXPECT_FALSE(other->attestation_key(0x81010009).is_ok());
}

TEST(TpmClient, NoDeviceMeansNoTpm) {
  auto tpm = tpm::Tpm::open("device:/dev/keygate-no-such-tpm");
  EXPECT_EQ(tpm.status().kind(), ErrorKind::kNotFound);
  EXPECT_EQ(tpm::Tpm::open("mssim:port=1").status().kind(), ErrorKind::kInvalidArgument);
}

}  // namespace
}  // namespace keygate::testing
