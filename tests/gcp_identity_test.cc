#include "server/gcp_identity.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include "core/encoding.h"
#include "core/file.h"
#include "tests/test_files.h"

namespace keygate::server {
namespace {

using test_files::read_file;

const std::string kGcp = test_files::kRealFixtures + "gcp/";
// The real token: iat 1616596223, exp 1616599823, RHSM's audience.
constexpr int64_t kIssuedAt = 1616596223;
const char kRealAudience[] = "https://subscription.rhsm.redhat.com:443/subscription";

JwkSet google_keys() {
  JwkSet keys;
  Status s = keys.add_json(read_file(kGcp + "jwks-6a8ba565.json"));
  EXPECT_TRUE(s.is_ok()) << s.message();
  return keys;
}

std::string real_token() { return read_file(kGcp + "rhsm-2021.identity.jwt"); }

GcpTokenCheck real_check() {
  GcpTokenCheck c;
  c.audience = kRealAudience;
  return c;
}

std::string b64url(const std::string& s) {
  return base64url_encode(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

TEST(GcpIdentity, RealTokenVerifies) {
  JwkSet keys = google_keys();
  EXPECT_EQ(keys.size(), 1u);
  FixedClock clock(kIssuedAt + 30);
  auto id = verify_gcp_identity_token(real_token(), keys, clock, real_check());
  ASSERT_TRUE(id.is_ok()) << id.status().message();
  EXPECT_EQ(id->platform, "gcp");
  EXPECT_EQ(id->claim("project_id"), "fair-kingdom-308514");
  EXPECT_EQ(id->claim("project_number"), "161958465613");
  EXPECT_EQ(id->claim("zone"), "us-east1-b");
  EXPECT_EQ(id->claim("instance_id"), "2589221140676718026");
  EXPECT_EQ(id->claim("instance_name"), "instance-1");
  EXPECT_EQ(id->claim("license_id"), "5731035067256925298");
  EXPECT_EQ(id->claim("service_account"), "161958465613-compute@developer.gserviceaccount.com");
}

TEST(GcpIdentity, EveryAlteredByteIsRefused) {
  JwkSet keys = google_keys();
  FixedClock clock(kIssuedAt + 30);
  const std::string good = real_token();
  size_t accepted = 0;
  for (size_t i = 0; i < good.size(); ++i) {
    // Bit 0 and bit 5 keep most characters inside the base64url alphabet
    // (a->` aside); bit 7 leaves ASCII.
    for (uint8_t flip : {0x01, 0x20, 0x80}) {
      std::string altered = good;
      altered[i] = static_cast<char>(altered[i] ^ flip);
      if (verify_gcp_identity_token(altered, keys, clock, real_check()).is_ok()) {
        ++accepted;
        ADD_FAILURE() << "altered byte " << i << " (xor " << int(flip) << ") was accepted";
      }
    }
  }
  EXPECT_EQ(accepted, 0u);
}

TEST(GcpIdentity, AudienceAndTimeWindowAreEnforced) {
  JwkSet keys = google_keys();
  FixedClock clock(kIssuedAt + 30);
  GcpTokenCheck other = real_check();
  other.audience = "keygate:v1:another-binding";
  auto r = verify_gcp_identity_token(real_token(), keys, clock, other);
  EXPECT_EQ(r.status().kind(), ErrorKind::kRefused);
  EXPECT_NE(r.status().message().find("audience"), std::string::npos);

  // Stale: older than the maximum age (300 s) plus the skew (60 s).
  FixedClock stale(kIssuedAt + 361);
  r = verify_gcp_identity_token(real_token(), keys, stale, real_check());
  EXPECT_EQ(r.status().kind(), ErrorKind::kRefused);
  EXPECT_NE(r.status().message().find("issued"), std::string::npos) << r.status().message();
  FixedClock edge(kIssuedAt + 360);
  EXPECT_TRUE(verify_gcp_identity_token(real_token(), keys, edge, real_check()).is_ok());
  // Expired (exp + skew passed) even with a generous age limit.
  GcpTokenCheck lenient = real_check();
  lenient.max_age_seconds = 6 * 3600;
  FixedClock expired(1616599823 + 61);
  r = verify_gcp_identity_token(real_token(), keys, expired, lenient);
  EXPECT_EQ(r.status().kind(), ErrorKind::kRefused);
  EXPECT_NE(r.status().message().find("expired"), std::string::npos);
  // Issued in the future.
  FixedClock early(kIssuedAt - 61);
  EXPECT_EQ(verify_gcp_identity_token(real_token(), keys, early, real_check()).status().kind(),
            ErrorKind::kRefused);
}

TEST(GcpIdentity, KeysOutsideTheTrustStoreAndOtherAlgorithmsAreRefused) {
  FixedClock clock(kIssuedAt + 30);
  const std::string token = real_token();
  // A JWK set without Google's key: same kid, another modulus.
  std::string jwks = read_file(kGcp + "jwks-6a8ba565.json");
  auto n_at = jwks.find("\"n\": \"") + 6;
  std::string forged = jwks;
  forged[n_at + 10] = forged[n_at + 10] == 'A' ? 'B' : 'A';
  JwkSet wrong;
  ASSERT_TRUE(wrong.add_json(forged).is_ok());
  auto r = verify_gcp_identity_token(token, wrong, clock, real_check());
  EXPECT_EQ(r.status().kind(), ErrorKind::kIntegrity);
  // Unknown kid.
  std::string other_kid = jwks;
  other_kid.replace(other_kid.find("6a8ba565"), 8, "00000000");
  JwkSet unknown;
  ASSERT_TRUE(unknown.add_json(other_kid).is_ok());
  r = verify_gcp_identity_token(token, unknown, clock, real_check());
  EXPECT_EQ(r.status().kind(), ErrorKind::kIntegrity);
  EXPECT_NE(r.status().message().find("not in the trust store"), std::string::npos);

  // The same payload under "alg": "none" or "HS256" is refused before any
  // signature check.
  JwkSet keys = google_keys();
  const std::string payload = token.substr(token.find('.') + 1, token.rfind('.') - token.find('.') - 1);
  for (const char* alg : {"none", "HS256", "RS512", "PS256"}) {
    std::string header = b64url(std::string("{\"alg\":\"") + alg +
                                "\",\"kid\":\"6a8ba5652a7044121d4fedac8f14d14c54e4895b\",\"typ\":\"JWT\"}");
    for (const std::string& sig : {std::string(""), token.substr(token.rfind('.') + 1)}) {
      auto res = verify_gcp_identity_token(header + "." + payload + "." + sig, keys, clock, real_check());
      EXPECT_FALSE(res.is_ok()) << alg;
    }
  }
}

TEST(GcpIdentity, TruncatedAndGarbageInputIsRefused) {
  JwkSet keys = google_keys();
  FixedClock clock(kIssuedAt + 30);
  const std::string good = real_token();
  for (size_t len : {size_t{0}, size_t{1}, size_t{10}, good.find('.'), good.find('.') + 1,
                     good.rfind('.'), good.rfind('.') + 1, good.size() - 1}) {
    auto r = verify_gcp_identity_token(good.substr(0, len), keys, clock, real_check());
    EXPECT_FALSE(r.is_ok()) << len;
  }
  for (const std::string& garbage :
       {std::string("..."), std::string("a.b.c"), std::string("a.b.c.d"), good + ".x",
        std::string(9000, 'A'), std::string("\0\0\0", 3), b64url("{}") + "." + b64url("{}") + ".AA"}) {
    EXPECT_FALSE(verify_gcp_identity_token(garbage, keys, clock, real_check()).is_ok());
  }
}

TEST(GcpIdentity, JwkSetsAreValidated) {
  JwkSet keys;
  EXPECT_FALSE(keys.add_json("{}").is_ok());
  EXPECT_FALSE(keys.add_json(R"({"keys": []})").is_ok());
  EXPECT_FALSE(keys.add_json(R"({"keys": [{"kty": "RSA", "kid": "k", "n": "AQAB", "e": "AQAB"}]})")
                   .is_ok());  // 24-bit modulus
  EXPECT_FALSE(keys.add_json(R"({"keys": [{"kty": "EC", "kid": "k", "crv": "P-256"}]})").is_ok());
  std::string jwks = read_file(kGcp + "jwks-6a8ba565.json");
  ASSERT_TRUE(keys.add_json(jwks).is_ok());
  EXPECT_FALSE(keys.add_json(jwks).is_ok());  // duplicate kid
}

TEST(GcpIdentity, TrustStoreFollowsTheFileAndKeepsKeysOnBadUpdates) {
  char dir[] = "/tmp/keygate-jwks-XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const std::string path = std::string(dir) + "/jwks.json";
  const std::string real = read_file(kGcp + "jwks-6a8ba565.json");
  ASSERT_TRUE(write_file_atomically(path, real, 0644).is_ok());
  GcpTrustStore store;
  ASSERT_TRUE(store.add_file(path).is_ok());
  FixedClock clock(kIssuedAt + 30);
  EXPECT_TRUE(verify_gcp_identity_token(real_token(), *store.keys(), clock, real_check()).is_ok());
  // Rotated to another key: the old token no longer verifies.
  std::string rotated = real;
  rotated.replace(rotated.find("6a8ba565"), 8, "11111111");
  ASSERT_TRUE(write_file_atomically(path, rotated, 0644).is_ok());
  EXPECT_FALSE(verify_gcp_identity_token(real_token(), *store.keys(), clock, real_check()).is_ok());
  // Back, then a broken update: the last good keys stay.
  ASSERT_TRUE(write_file_atomically(path, real, 0644).is_ok());
  EXPECT_TRUE(verify_gcp_identity_token(real_token(), *store.keys(), clock, real_check()).is_ok());
  ASSERT_TRUE(write_file_atomically(path, "{not json", 0644).is_ok());
  EXPECT_TRUE(verify_gcp_identity_token(real_token(), *store.keys(), clock, real_check()).is_ok());
  EXPECT_FALSE(GcpTrustStore().add_file(path).is_ok());
  unlink(path.c_str());
  rmdir(dir);
}

}  // namespace
}  // namespace keygate::server
