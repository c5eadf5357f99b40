#include <gtest/gtest.h>

#include <cstring>

#include "core/envelope.h"
#include "core/protocol.h"

namespace keygate {
namespace {

struct Sides {
  X25519KeyPair client = X25519KeyPair::generate().value();
  SecretBuffer secret = SecretBuffer::random(32).value();
  Bytes nonce = random_bytes(32);
  std::string volume = "3f1c9a4e-0b7d-4c55-9a61-2d7e8f0a1b2c";
  Bytes client_pub() const { return Bytes(client.public_key.begin(), client.public_key.end()); }
};

TEST(Envelope, RoundTrip) {
  Sides s;
  auto wrapped = wrap_secret_for_client(s.secret, s.client_pub(), s.volume, s.nonce);
  ASSERT_TRUE(wrapped.is_ok()) << wrapped.status().message();
  auto parsed = WrappedSecret::from_json(wrapped->to_json());
  ASSERT_TRUE(parsed.is_ok());
  auto opened = unwrap_secret(parsed.value(), s.client, s.volume, s.nonce);
  ASSERT_TRUE(opened.is_ok()) << opened.status().message();
  EXPECT_TRUE(opened->equals(s.secret));
}

TEST(Envelope, EveryAlteredByteIsRejected) {
  Sides s;
  auto wrapped = wrap_secret_for_client(s.secret, s.client_pub(), s.volume, s.nonce).value();
  for (size_t i = 0; i < wrapped.sealed.size(); ++i) {
    WrappedSecret altered = wrapped;
    altered.sealed[i] ^= 0x80;
    auto r = unwrap_secret(altered, s.client, s.volume, s.nonce);
    ASSERT_FALSE(r.is_ok()) << "sealed byte " << i;
    EXPECT_EQ(r.status().kind(), ErrorKind::kIntegrity);
  }
  for (size_t i = 0; i < wrapped.server_public.size(); ++i) {
    WrappedSecret altered = wrapped;
    altered.server_public[i] ^= 0x01;
    EXPECT_FALSE(unwrap_secret(altered, s.client, s.volume, s.nonce).is_ok()) << "epk byte " << i;
  }
}

TEST(Envelope, WrongKeyVolumeOrNonceIsRejected) {
  Sides s;
  auto wrapped = wrap_secret_for_client(s.secret, s.client_pub(), s.volume, s.nonce).value();
  auto stranger = X25519KeyPair::generate().value();
  EXPECT_EQ(unwrap_secret(wrapped, stranger, s.volume, s.nonce).status().kind(),
            ErrorKind::kIntegrity);
  EXPECT_FALSE(unwrap_secret(wrapped, s.client, "another-volume", s.nonce).is_ok());
  EXPECT_FALSE(unwrap_secret(wrapped, s.client, s.volume, random_bytes(32)).is_ok());
}

TEST(Envelope, MalformedJsonIsRejected) {
  Sides s;
  Json::Value good = wrap_secret_for_client(s.secret, s.client_pub(), s.volume, s.nonce)->to_json();
  Json::Value v = good;
  v["alg"] = "none";
  EXPECT_FALSE(WrappedSecret::from_json(v).is_ok());
  v = good;
  v["epk"] = "AAAA";
  EXPECT_FALSE(WrappedSecret::from_json(v).is_ok());
  v = good;
  v.removeMember("sealed");
  EXPECT_FALSE(WrappedSecret::from_json(v).is_ok());
  v = good;
  v["sealed"] = 5;
  EXPECT_FALSE(WrappedSecret::from_json(v).is_ok());
}

TEST(Envelope, LowOrderClientKeyIsRefused) {
  Sides s;
  Bytes zero(32, 0);
  EXPECT_FALSE(wrap_secret_for_client(s.secret, zero, s.volume, s.nonce).is_ok());
  EXPECT_FALSE(wrap_secret_for_client(s.secret, Bytes(31, 1), s.volume, s.nonce).is_ok());
}

TEST(Envelope, BindingValueCoversEveryInput) {
  Sides s;
  Bytes b = binding_value(s.nonce, s.client_pub(), s.volume);
  EXPECT_EQ(b.size(), 32u);
  EXPECT_NE(b, binding_value(random_bytes(32), s.client_pub(), s.volume));
  EXPECT_NE(b, binding_value(s.nonce, random_bytes(32), s.volume));
  EXPECT_NE(b, binding_value(s.nonce, s.client_pub(), "other"));
  // SHA-256("keygate-v1" || nonce || pub || id), checked independently.
  std::string input = "keygate-v1";
  input.append(as_string_view(s.nonce));
  input.append(as_string_view(s.client_pub()));
  input.append(s.volume);
  EXPECT_EQ(b, sha256(input));
}

TEST(Protocol, VolumeIdAlphabetAndConfirmation) {
  EXPECT_TRUE(api::is_valid_volume_id("3f1c9a4e-0b7d-4c55-9a61-2d7e8f0a1b2c"));
  EXPECT_FALSE(api::is_valid_volume_id(""));
  EXPECT_FALSE(api::is_valid_volume_id("a/b"));
  EXPECT_FALSE(api::is_valid_volume_id(std::string(65, 'a')));
  Sides s;
  auto other = SecretBuffer::random(32).value();
  EXPECT_NE(api::enrollment_confirmation(s.secret, s.volume),
            api::enrollment_confirmation(other, s.volume));
  EXPECT_NE(api::enrollment_confirmation(s.secret, s.volume),
            api::enrollment_confirmation(s.secret, "x"));
}

}  // namespace
}  // namespace keygate
