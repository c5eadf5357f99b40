#include "server/aws_identity.h"

#include <gtest/gtest.h>

#include "core/encoding.h"
#include "tests/test_files.h"

namespace keygate::server {
namespace {

using test_files::read_file;

const std::string kAws = test_files::kRealFixtures + "aws/";
const std::string kShippedTrust = std::string(KEYGATE_SOURCE_DIR) + "/server/trust/aws/rsa2048";
// 2026-02-16T01:00:00Z: just after the real document was signed.
constexpr int64_t kSampleTime = 1771203600;

AwsTrustStore shipped_trust() {
  AwsTrustStore trust;
  Status s = trust.add_directory(kShippedTrust);
  EXPECT_TRUE(s.is_ok()) << s.message();
  return trust;
}

Bytes real_pkcs7() { return to_bytes(read_file(kAws + "ap-southeast-2.rsa2048.der")); }

TEST(AwsIdentity, ShippedTrustStoreCoversEveryRegion) {
  AwsTrustStore trust = shipped_trust();
  EXPECT_GE(trust.region_count(), 30u);
}

TEST(AwsIdentity, RealRsa2048SampleVerifies) {
  AwsTrustStore trust = shipped_trust();
  FixedClock clock(kSampleTime);
  auto id = verify_aws_identity(real_pkcs7(), trust, clock);
  ASSERT_TRUE(id.is_ok()) << id.status().message();
  EXPECT_EQ(id->account_id, "189292791360");
  EXPECT_EQ(id->region, "ap-southeast-2");
  EXPECT_EQ(id->instance_id, "i-0c5541936caf78c12");
  EXPECT_EQ(id->image_id, "ami-0cbde744623b7506b");
  EXPECT_EQ(id->instance_type, "t4g.small");
  // The base64 form as served by IMDS decodes to the same structure.
  auto from_b64 = base64_decode(read_file(kAws + "ap-southeast-2.rsa2048.b64"), true);
  ASSERT_TRUE(from_b64.is_ok());
  EXPECT_TRUE(verify_aws_identity(from_b64.value(), trust, clock).is_ok());
}

TEST(AwsIdentity, EveryAlteredByteIsRefused) {
  AwsTrustStore trust = shipped_trust();
  FixedClock clock(kSampleTime);
  const Bytes good = real_pkcs7();
  size_t accepted = 0;
  for (size_t i = 0; i < good.size(); ++i) {
    for (uint8_t flip : {0x01, 0x80}) {
      Bytes altered = good;
      altered[i] ^= flip;
      auto r = verify_aws_identity(altered, trust, clock);
      if (r.is_ok()) {
        ++accepted;
        ADD_FAILURE() << "altered byte " << i << " (xor " << int(flip) << ") was accepted";
      }
    }
  }
  EXPECT_EQ(accepted, 0u);
}

TEST(AwsIdentity, TruncatedAndGarbageInputIsRefused) {
  AwsTrustStore trust = shipped_trust();
  FixedClock clock(kSampleTime);
  const Bytes good = real_pkcs7();
  for (size_t len : {size_t{0}, size_t{1}, size_t{10}, good.size() / 2, good.size() - 1}) {
    Bytes cut(good.begin(), good.begin() + static_cast<long>(len));
    EXPECT_FALSE(verify_aws_identity(cut, trust, clock).is_ok()) << len;
  }
  EXPECT_FALSE(verify_aws_identity(to_bytes("garbage"), trust, clock).is_ok());
  EXPECT_FALSE(verify_aws_identity(Bytes(9000, 0x30), trust, clock).is_ok());
}

TEST(AwsIdentity, OtherRegionsCertificateDoesNotVerify) {
  // Trust only us-east-1's certificate, filed under ap-southeast-2: the real
  // document must not verify against a certificate that did not sign it.
  AwsTrustStore wrong;
  ASSERT_TRUE(wrong.add_pem("ap-southeast-2", read_file(kShippedTrust + "/us-east-1.pem")).is_ok());
  FixedClock clock(kSampleTime);
  auto r = verify_aws_identity(real_pkcs7(), wrong, clock);
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().kind(), ErrorKind::kIntegrity);
  // And a store without the document's region refuses outright.
  AwsTrustStore none;
  ASSERT_TRUE(none.add_pem("us-east-1", read_file(kShippedTrust + "/us-east-1.pem")).is_ok());
  EXPECT_FALSE(verify_aws_identity(real_pkcs7(), none, clock).is_ok());
}

TEST(AwsIdentity, CertificateValidityFollowsTheClock) {
  AwsTrustStore trust = shipped_trust();
  // The certificate is valid from 2015: a clock in 2010 must refuse.
  FixedClock before(1262304000);
  EXPECT_FALSE(verify_aws_identity(real_pkcs7(), trust, before).is_ok());
}

TEST(AwsIdentity, DocumentParserValidatesFields) {
  auto id = parse_aws_identity_document(read_file(kAws + "ap-southeast-2.document.json"));
  ASSERT_TRUE(id.is_ok());
  EXPECT_EQ(id->availability_zone, "ap-southeast-2a");
  EXPECT_FALSE(parse_aws_identity_document("{}").is_ok());
  EXPECT_FALSE(parse_aws_identity_document(R"({"accountId":1,"region":"r","instanceId":"i","imageId":"a"})").is_ok());
  EXPECT_FALSE(parse_aws_identity_document(R"({"accountId":"","region":"r","instanceId":"i","imageId":"a"})").is_ok());
}

TEST(AwsIdentity, TrustStoreRejectsBadInput) {
  AwsTrustStore t;
  EXPECT_FALSE(t.add_pem("../etc", "x").is_ok());
  EXPECT_FALSE(t.add_pem("us-east-1", "not pem").is_ok());
  EXPECT_FALSE(t.add_directory("/nonexistent").is_ok());
}

}  // namespace
}  // namespace keygate::server
