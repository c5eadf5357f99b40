#include "server/azure_identity.h"

#include <gtest/gtest.h>

#include "core/encoding.h"
#include "tests/test_files.h"

namespace keygate::server {
namespace {

using test_files::read_file;

const std::string kAzure = test_files::kRealFixtures + "azure/";

struct Sample {
  const char* name;
  int64_t created;  // the document's createdOn
  const char* nonce;
  const char* vm_id;
};

// Each verifies at its own creation time plus a minute: inside the leaf's,
// the intermediate's and the root's validity and the document's window.
const Sample kSamples[] = {
    {"regular", 1650331641, "20220419-072721", "bd8e7443-24a0-41f3-b949-8baf4fd1c573"},
    {"govcloud", 1678295373, "20230308-230933", "990878d4-068a-4ac4-9ee9-1231d2218ef2"},
    {"rhsm-2021", 1609768534, "20210104-195534", "f904ece8-c6c1-4b5c-881f-309b50f25e56"},
};

AzureTrustStore microsoft_trust() {
  AzureTrustStore trust;
  for (const char* f : {"root-baltimore-cybertrust.pem", "root-digicert-global-root-g2.pem",
                        "intermediate-microsoft-rsa-tls-ca-01.pem",
                        "intermediate-microsoft-azure-tls-issuing-ca-05.pem"}) {
    Status s = trust.add_pem(read_file(kAzure + f), f);
    EXPECT_TRUE(s.is_ok()) << s.message();
  }
  EXPECT_EQ(trust.root_count(), 2u);
  EXPECT_EQ(trust.intermediate_count(), 2u);
  return trust;
}

Bytes pkcs7(const Sample& s) { return to_bytes(read_file(kAzure + s.name + ".pkcs7.der")); }

AzureDocumentCheck check_for(const Sample& s) {
  AzureDocumentCheck c;
  c.nonce = s.nonce;
  return c;
}

TEST(AzureIdentity, RealDocumentsVerify) {
  AzureTrustStore trust = microsoft_trust();
  for (const Sample& s : kSamples) {
    FixedClock clock(s.created + 60);
    auto id = verify_azure_attested_document(pkcs7(s), trust, clock, check_for(s));
    ASSERT_TRUE(id.is_ok()) << s.name << ": " << id.status().message();
    EXPECT_EQ(id->platform, "azure");
    EXPECT_EQ(id->claim("vm_id"), s.vm_id) << s.name;
  }
  FixedClock clock(kSamples[0].created + 60);
  auto id = verify_azure_attested_document(pkcs7(kSamples[0]), trust, clock, check_for(kSamples[0]));
  ASSERT_TRUE(id.is_ok());
  EXPECT_EQ(id->claim("subscription_id"), "5f130ffc-0a3e-4795-b691-4f56a12a5547");
  EXPECT_EQ(id->claim("sku"), "20_04-lts-gen2");
  // The attested.json's signature field is the same structure.
  auto attested = read_file(kAzure + "regular.signature.b64");
  auto der = base64_decode(attested, true);
  ASSERT_TRUE(der.is_ok());
  EXPECT_TRUE(verify_azure_attested_document(der.value(), trust, clock, check_for(kSamples[0])).is_ok());
}

TEST(AzureIdentity, EveryAlteredByteIsRefused) {
  AzureTrustStore trust = microsoft_trust();
  size_t accepted = 0;
  for (const Sample& s : kSamples) {
    FixedClock clock(s.created + 60);
    const Bytes good = pkcs7(s);
    for (size_t i = 0; i < good.size(); ++i) {
      for (uint8_t flip : {0x01, 0x80}) {
        Bytes altered = good;
        altered[i] ^= flip;
        if (verify_azure_attested_document(altered, trust, clock, check_for(s)).is_ok()) {
          ++accepted;
          ADD_FAILURE() << s.name << ": altered byte " << i << " (xor " << int(flip)
                        << ") was accepted";
        }
      }
    }
  }
  EXPECT_EQ(accepted, 0u);
}

TEST(AzureIdentity, NonceWindowAndChainAreEnforced) {
  AzureTrustStore trust = microsoft_trust();
  const Sample& s = kSamples[0];
  FixedClock clock(s.created + 60);
  AzureDocumentCheck other = check_for(s);
  other.nonce = "0123456789abcdef0123456789abcdef";
  auto r = verify_azure_attested_document(pkcs7(s), trust, clock, other);
  EXPECT_EQ(r.status().kind(), ErrorKind::kRefused);
  EXPECT_NE(r.status().message().find("nonce"), std::string::npos);
  // Older than the maximum age plus skew.
  FixedClock stale(s.created + 361);
  r = verify_azure_attested_document(pkcs7(s), trust, stale, check_for(s));
  EXPECT_EQ(r.status().kind(), ErrorKind::kRefused);
  EXPECT_NE(r.status().message().find("created"), std::string::npos) << r.status().message();
  // Before its creation (beyond skew).
  FixedClock early(s.created - 61);
  EXPECT_EQ(verify_azure_attested_document(pkcs7(s), trust, early, check_for(s)).status().kind(),
            ErrorKind::kRefused);
  // The leaf expired on 2023-02-20: the chain fails whatever the age limit.
  AzureDocumentCheck lenient = check_for(s);
  lenient.max_age_seconds = 400L * 24 * 3600;
  FixedClock after_leaf(1677000000);
  r = verify_azure_attested_document(pkcs7(s), trust, after_leaf, lenient);
  EXPECT_EQ(r.status().kind(), ErrorKind::kIntegrity) << r.status().message();

  // Without Microsoft's intermediate, or under another root, nothing chains.
  AzureTrustStore roots_only;
  ASSERT_TRUE(roots_only.add_pem(read_file(kAzure + "root-baltimore-cybertrust.pem"), "root").is_ok());
  EXPECT_EQ(verify_azure_attested_document(pkcs7(s), roots_only, clock, check_for(s)).status().kind(),
            ErrorKind::kIntegrity);
  AzureTrustStore other_root;
  ASSERT_TRUE(other_root.add_pem(read_file(kAzure + "root-digicert-global-root-g2.pem"), "r").is_ok());
  ASSERT_TRUE(other_root.add_pem(read_file(kAzure + "intermediate-microsoft-azure-tls-issuing-ca-05.pem"), "i").is_ok());
  EXPECT_EQ(verify_azure_attested_document(pkcs7(s), other_root, clock, check_for(s)).status().kind(),
            ErrorKind::kIntegrity);
  EXPECT_FALSE(verify_azure_attested_document(pkcs7(s), AzureTrustStore(), clock, check_for(s)).is_ok());
}

TEST(AzureIdentity, TruncatedAndGarbageInputIsRefused) {
  AzureTrustStore trust = microsoft_trust();
  const Sample& s = kSamples[0];
  FixedClock clock(s.created + 60);
  const Bytes good = pkcs7(s);
  for (size_t len : {size_t{0}, size_t{1}, size_t{2}, size_t{16}, good.size() / 2, good.size() - 1}) {
    Bytes cut(good.begin(), good.begin() + static_cast<long>(len));
    EXPECT_FALSE(verify_azure_attested_document(cut, trust, clock, check_for(s)).is_ok()) << len;
  }
  Bytes longer = good;
  longer.push_back(0);
  EXPECT_FALSE(verify_azure_attested_document(longer, trust, clock, check_for(s)).is_ok());
  EXPECT_FALSE(verify_azure_attested_document(Bytes(20000, 0x30), trust, clock, check_for(s)).is_ok());
  EXPECT_FALSE(verify_azure_attested_document(to_bytes("not a signature"), trust, clock, check_for(s)).is_ok());
  // The AWS shape (signed attributes, no certificates) is not Azure's.
  Bytes aws = to_bytes(read_file(test_files::kRealFixtures + "aws/ap-southeast-2.rsa2048.der"));
  EXPECT_FALSE(verify_azure_attested_document(aws, trust, clock, check_for(s)).is_ok());
}

TEST(AzureIdentity, SignerNamesAndTimestamps) {
  for (const char* ok : {"metadata.azure.com", "southcentralus.metadata.azure.com",
                         "metadata.azure.us", "a.b.metadata.azure.cn", "metadata.microsoftazure.de"}) {
    EXPECT_TRUE(is_azure_metadata_name(ok)) << ok;
  }
  for (const char* bad : {"", "metadata.azure.com.evil.com", "evilmetadata.azure.com",
                          ".metadata.azure.com", "metadata.azure.org", "METADATA.AZURE.COM",
                          "x.metadata.azure.co", "metadata-azure.com"}) {
    EXPECT_FALSE(is_azure_metadata_name(bad)) << bad;
  }
  EXPECT_EQ(parse_azure_timestamp("04/19/22 01:27:21 -0000").value(), 1650331641);
  EXPECT_EQ(parse_azure_timestamp("04/19/22 03:27:21 +0200").value(), 1650331641);
  for (const char* bad : {"", "04/19/2022 01:27:21 -0000", "13/19/22 01:27:21 -0000",
                          "04/19/22 01:27:21", "04/19/22 01:27:21 -9999", "04-19-22 01:27:21 -0000",
                          "04/19/22 25:27:21 -0000"}) {
    EXPECT_FALSE(parse_azure_timestamp(bad).is_ok()) << bad;
  }
}

}  // namespace
}  // namespace keygate::server
