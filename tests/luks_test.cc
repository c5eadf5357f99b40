// LUKS2 on loop files through libcryptsetup. Activation is verify-only (a
// NULL name), which needs no device-mapper.
#include "unlocker/luks.h"

#include <fcntl.h>
#include <libcryptsetup.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <iterator>

#include "core/crypto.h"
#include "core/json.h"

namespace keygate::unlocker {
namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

class LuksTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/keygate-luks-XXXXXX";
    dir_ = mkdtemp(tmpl);
    image_ = dir_ + "/vol.img";
    int fd = open(image_.c_str(), O_CREAT | O_WRONLY, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(ftruncate(fd, 32 << 20), 0);
    close(fd);
    ca_pem_ = read_file(std::string(KEYGATE_FIXTURES) + "/real/aws/cert-rsa2048-ap-southeast-2.pem");
  }
  void TearDown() override { ASSERT_EQ(system(("rm -rf '" + dir_ + "'").c_str()), 0); }

  KeygateToken token(int keyslot) {
    KeygateToken t;
    t.servers = {"https://keys.example:8443", "https://keys2.example:8443"};
    t.volume_id = "0a1b2c3d-0000-4000-8000-000000000001";
    t.ca_pem = ca_pem_;
    t.ca_sha256 = certificate_sha256_fingerprint(ca_pem_).value();
    t.keyslot = keyslot;
    return t;
  }

  std::string dir_, image_, ca_pem_;
};

TEST_F(LuksTest, FormatEnrollAndVerifyOnly) {
  ASSERT_TRUE(check_device_blank(image_).is_ok());
  auto dev = LuksDevice::format(image_, 512);
  ASSERT_TRUE(dev.is_ok()) << dev.status().message();
  auto secret = SecretBuffer::random(32).value();
  auto slot = dev->add_keyslot_after_format(secret, KeyslotCost::kHighEntropySecret);
  ASSERT_TRUE(slot.is_ok()) << slot.status().message();
  auto tid = dev->add_token(token(slot.value()));
  ASSERT_TRUE(tid.is_ok()) << tid.status().message();

  auto reopened = LuksDevice::open(image_);
  ASSERT_TRUE(reopened.is_ok());
  auto found = reopened->find_keygate_token();
  ASSERT_TRUE(found.is_ok()) << found.status().message();
  ASSERT_TRUE(found->has_value());
  EXPECT_EQ(found.value()->second.volume_id, "0a1b2c3d-0000-4000-8000-000000000001");
  EXPECT_EQ(found.value()->second.servers.size(), 2u);
  EXPECT_EQ(found.value()->second.keyslot, slot.value());

  auto ok = reopened->activate("", slot.value(), secret);
  ASSERT_TRUE(ok.is_ok()) << ok.status().message();
  auto wrong = SecretBuffer::random(32).value();
  auto refused = reopened->activate("", slot.value(), wrong);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_EQ(refused.status().kind(), ErrorKind::kRefused);

  // The keyslot uses PBKDF2 at minimum cost.
  Json::Value d = reopened->describe();
  ASSERT_EQ(d["keyslots"].size(), 1u);
  EXPECT_EQ(d["keyslots"][0]["kdf"].asString(), "pbkdf2");
  // ... with SHA-512, which is also the anti-forensic hash (one hash per
  // stripe of a 64-byte key), as the header on disk says.
  crypt_device* cd = nullptr;
  ASSERT_EQ(crypt_init(&cd, image_.c_str()), 0);
  ASSERT_EQ(crypt_load(cd, CRYPT_LUKS2, nullptr), 0);
  const char* dumped = nullptr;
  ASSERT_EQ(crypt_dump_json(cd, &dumped, 0), 0);
  auto header = parse_json_object(dumped);
  crypt_free(cd);
  ASSERT_TRUE(header.is_ok()) << header.status().message();
  const Json::Value& keyslot = header.value()["keyslots"][std::to_string(slot.value())];
  EXPECT_EQ(keyslot["kdf"]["hash"].asString(), "sha512");
  EXPECT_EQ(keyslot["kdf"]["iterations"].asInt(), 1000);
  EXPECT_EQ(keyslot["af"]["hash"].asString(), "sha512");
  EXPECT_EQ(keyslot["af"]["stripes"].asInt(), 4000);
  // A formatted device is no longer blank.
  EXPECT_FALSE(check_device_blank(image_).is_ok());
}

TEST_F(LuksTest, AddKeyslotNeedsTheExistingPassphrase) {
  auto dev = LuksDevice::format(image_, 4096);
  ASSERT_TRUE(dev.is_ok());
  auto pass = SecretBuffer::copy_of("correct horse", 13).value();
  ASSERT_TRUE(dev->add_keyslot_after_format(pass, KeyslotCost::kHighEntropySecret).is_ok());
  auto secret = SecretBuffer::random(32).value();
  auto bad = SecretBuffer::copy_of("wrong", 5).value();
  auto refused = dev->add_keyslot(bad, secret, KeyslotCost::kHighEntropySecret);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_EQ(refused.status().kind(), ErrorKind::kRefused);
  EXPECT_EQ(dev->describe()["keyslots"].size(), 1u);  // nothing added
  auto added = dev->add_keyslot(pass, secret, KeyslotCost::kHighEntropySecret);
  ASSERT_TRUE(added.is_ok());
  EXPECT_TRUE(dev->activate("", added.value(), secret).is_ok());
  ASSERT_TRUE(dev->destroy_keyslot(added.value()).is_ok());
  EXPECT_FALSE(dev->activate("", added.value(), secret).is_ok());
  EXPECT_TRUE(dev->activate("", -1, pass).is_ok());  // the original still opens
}

TEST_F(LuksTest, TokenWithAlteredCaIsRefused) {
  auto dev = LuksDevice::format(image_, 512);
  ASSERT_TRUE(dev.is_ok());
  auto secret = SecretBuffer::random(32).value();
  int slot = dev->add_keyslot_after_format(secret, KeyslotCost::kHighEntropySecret).value();
  KeygateToken t = token(slot);
  t.ca_sha256[0] = t.ca_sha256[0] == '0' ? '1' : '0';
  ASSERT_TRUE(dev->add_token(t).is_ok());
  auto found = LuksDevice::open(image_)->find_keygate_token();
  ASSERT_FALSE(found.is_ok());
  EXPECT_EQ(found.status().kind(), ErrorKind::kUntrusted);
}

TEST_F(LuksTest, TokenValidation) {
  Json::Value v = token(1).to_json();
  EXPECT_TRUE(KeygateToken::from_json(v).is_ok());
  Json::Value bad = v;
  bad["servers"][0] = "http://plain.example";
  EXPECT_FALSE(KeygateToken::from_json(bad).is_ok());
  bad = v;
  bad["servers"] = Json::Value(Json::arrayValue);
  EXPECT_FALSE(KeygateToken::from_json(bad).is_ok());
  bad = v;
  bad["volume_id"] = "../../etc";
  EXPECT_FALSE(KeygateToken::from_json(bad).is_ok());
  bad = v;
  bad["keyslots"].append("2");
  EXPECT_FALSE(KeygateToken::from_json(bad).is_ok());
}

TEST_F(LuksTest, BlankCheckRefusesFilesystemsAndEraseRestoresBlank) {
  std::string fs = dir_ + "/fs.img";
  ASSERT_EQ(system(("truncate -s 8M '" + fs + "' && mke2fs -q -F -t ext4 '" + fs + "'").c_str()),
            0);
  Status s = check_device_blank(fs);
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("ext4"), std::string::npos);

  auto dev = LuksDevice::format(image_, 512);
  ASSERT_TRUE(dev.is_ok());
  ASSERT_TRUE(dev->erase_header().is_ok());
  EXPECT_TRUE(check_device_blank(image_).is_ok());
  EXPECT_FALSE(LuksDevice::open(image_).is_ok());
}

TEST_F(LuksTest, OpenRefusesNonLuks) {
  auto r = LuksDevice::open(image_);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("not a LUKS2 device"), std::string::npos);
  EXPECT_FALSE(LuksDevice::open(dir_ + "/missing").is_ok());
}

}  // namespace
TEST(ServerUrls, NewServersAreStrictAndTokensKeepWhatEarlierVersionsWrote) {
  EXPECT_TRUE(check_server_list({"https://keys.internal:8443"}, "--server").is_ok());
  for (const char* bad : {"http://keys:8443", "https://", "https://keys /x", "https://k\x1b[2J"}) {
    EXPECT_FALSE(check_server_url(bad).is_ok()) << bad;
    EXPECT_FALSE(check_server_list({bad}, "--server").is_ok()) << bad;
  }
  // A query or user name: refused for a new enrollment, still read in a
  // token an earlier keygate wrote.
  EXPECT_FALSE(check_server_list({"https://u@keys:8443"}, "--server").is_ok());
  EXPECT_TRUE(check_server_url("https://u@keys:8443").is_ok());
  EXPECT_FALSE(check_server_list({}, "--server").is_ok());
  EXPECT_FALSE(check_server_list(std::vector<std::string>(9, "https://k"), "--server").is_ok());
}

}  // namespace keygate::unlocker
