#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <json/writer.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include <openssl/crypto.h>

#include "core/args.h"
#include "core/crypto.h"
#include "core/encoding.h"
#include "core/json.h"
#include "core/secret.h"
#include "core/status.h"

namespace keygate {
namespace {

TEST(Status, OkAndErrorCarryKindAndContext) {
  EXPECT_TRUE(Status::ok().is_ok());
  Status s = Status::error(ErrorKind::kRefused, "policy says no");
  EXPECT_FALSE(s.is_ok());
  EXPECT_EQ(s.kind(), ErrorKind::kRefused);
  Status c = s.with_context("unlock(/dev/vdb)");
  EXPECT_EQ(c.message(), "unlock(/dev/vdb): policy says no");
  EXPECT_EQ(c.kind(), ErrorKind::kRefused);
}

TEST(Result, HoldsValueOrStatus) {
  Result<int> good(7);
  ASSERT_TRUE(good.is_ok());
  EXPECT_EQ(good.value(), 7);
  Result<int> bad(Status::error(ErrorKind::kIo, "disk"));
  EXPECT_FALSE(bad.is_ok());
  EXPECT_EQ(bad.status().message(), "disk");
  // A Result built from an OK status is an internal error, never a value.
  Result<int> odd(Status::ok());
  EXPECT_FALSE(odd.is_ok());
  EXPECT_EQ(odd.status().kind(), ErrorKind::kInternal);
}

TEST(SecretBuffer, IsMoveOnlyAndLeavesSourceEmpty) {
  static_assert(!std::is_copy_constructible_v<SecretBuffer>);
  static_assert(!std::is_copy_assignable_v<SecretBuffer>);
  auto a = SecretBuffer::copy_of("abcd", 4);
  ASSERT_TRUE(a.is_ok());
  SecretBuffer b = std::move(a).value();
  EXPECT_EQ(b.size(), 4u);
  EXPECT_EQ(memcmp(b.data(), "abcd", 4), 0);
  SecretBuffer c = std::move(b);
  EXPECT_EQ(b.size(), 0u);  // NOLINT: moved-from state is specified
  EXPECT_EQ(b.data(), nullptr);
  EXPECT_EQ(c.size(), 4u);
}

// The kernel's flags for the mapping holding `p` (/proc/self/smaps VmFlags).
std::string mapping_flags(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  const auto addr = reinterpret_cast<uintptr_t>(p);
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2 && line.find(':') > line.find(' ')) {
      inside = addr >= lo && addr < hi;
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      return line;
    }
  }
  return "";
}

bool has_flag(const std::string& flags, const char* flag) {
  return flags.find(std::string(" ") + flag) != std::string::npos;
}

TEST(SecretBuffer, MemoryIsLockedUndumpedAndWipedOnFork) {
  // A small secret (a pool slot) and a large one (a mapping of its own).
  for (size_t size : {size_t{32}, kSecretSlotSize, size_t{3 * 4096 + 1}}) {
    auto s = SecretBuffer::random(size);
    ASSERT_TRUE(s.is_ok());
    const std::string flags = mapping_flags(s->data());
    ASSERT_FALSE(flags.empty()) << size;
    EXPECT_TRUE(has_flag(flags, "lo")) << size << ": not locked: " << flags;
    EXPECT_TRUE(has_flag(flags, "dd")) << size << ": would be in a core dump: " << flags;
    EXPECT_TRUE(has_flag(flags, "wf")) << size << ": inherited by a child: " << flags;
    // Two random secrets differ.
    auto t = SecretBuffer::random(size);
    EXPECT_FALSE(s->equals(t.value()));
  }
}

TEST(SecretBuffer, PoolSlotsComeBackWipedAndAreReused) {
  const size_t before = secret_slots_in_use();
  std::vector<SecretBuffer> held;
  std::set<const uint8_t*> addresses;
  for (int i = 0; i < 600; ++i) {  // more than one chunk of slots
    auto s = SecretBuffer::copy_of("0123456789abcdef0123456789abcdef", 32);
    ASSERT_TRUE(s.is_ok());
    addresses.insert(s->data());
    held.push_back(std::move(s).value());
  }
  EXPECT_EQ(addresses.size(), 600u);  // no slot handed out twice
  EXPECT_EQ(secret_slots_in_use(), before + 600);
  held.clear();
  EXPECT_EQ(secret_slots_in_use(), before);
  // A slot handed out again holds nothing of its last secret.
  for (int i = 0; i < 600; ++i) {
    auto s = SecretBuffer::allocate(kSecretSlotSize);
    ASSERT_TRUE(s.is_ok());
    if (addresses.count(s->data()) == 0) continue;
    for (size_t b = 0; b < kSecretSlotSize; ++b) ASSERT_EQ(s->data()[b], 0) << b;
    held.push_back(std::move(s).value());
  }
  EXPECT_FALSE(held.empty());
}

TEST(SecretBuffer, OpenSslKeysLiveInTheSecureHeap) {
  ASSERT_TRUE(init_openssl_secure_heap(kSecureHeapClient).is_ok());
  ASSERT_EQ(CRYPTO_secure_malloc_initialized(), 1);
  // OpenSSL keeps some of its own state there for good (its random
  // generator's): set up by a first key, before counting.
  ASSERT_TRUE(X25519KeyPair::generate().is_ok());
  const size_t before = CRYPTO_secure_used();
  {
    auto kp = X25519KeyPair::generate();
    ASSERT_TRUE(kp.is_ok());
    EXPECT_GT(CRYPTO_secure_used(), before) << "the private key is not in the secure heap";
    auto peer = X25519KeyPair::generate();
    ASSERT_TRUE(peer.is_ok());
    auto a = kp->shared_secret(Bytes(peer->public_key.begin(), peer->public_key.end()));
    auto b = peer->shared_secret(Bytes(kp->public_key.begin(), kp->public_key.end()));
    ASSERT_TRUE(a.is_ok() && b.is_ok());
    EXPECT_TRUE(a->equals(b.value()));
  }
  EXPECT_EQ(CRYPTO_secure_used(), before) << "a key was not freed";
}

TEST(SecretBuffer, TruncateWipesTail) {
  auto s = SecretBuffer::copy_of("secret!!", 8);
  ASSERT_TRUE(s.is_ok());
  uint8_t* p = s->data();
  s->truncate(3);
  EXPECT_EQ(s->size(), 3u);
  for (int i = 3; i < 8; ++i) EXPECT_EQ(p[i], 0) << i;
}

TEST(SecretBuffer, ReadSecretFileBoundsAndStripsNewline) {
  char path[] = "/tmp/keygate-secret-XXXXXX";
  int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(write(fd, "hunter2\n", 8), 8);
  close(fd);
  auto s = read_secret_file(path, 64, true);
  ASSERT_TRUE(s.is_ok()) << s.status().message();
  EXPECT_EQ(s->size(), 7u);
  EXPECT_EQ(memcmp(s->data(), "hunter2", 7), 0);
  auto too_big = read_secret_file(path, 4, true);
  EXPECT_FALSE(too_big.is_ok());
  EXPECT_EQ(too_big.status().kind(), ErrorKind::kInvalidArgument);
  // The error names the file, never its content.
  EXPECT_EQ(too_big.status().message().find("hunter2"), std::string::npos);
  unlink(path);
  EXPECT_FALSE(read_secret_file(path, 64, true).is_ok());
}

TEST(Base64, Rfc4648Vectors) {
  const std::pair<const char*, const char*> vectors[] = {
      {"", ""},         {"f", "Zg=="},         {"fo", "Zm8="},        {"foo", "Zm9v"},
      {"foob", "Zm9vYg=="}, {"fooba", "Zm9vYmE="}, {"foobar", "Zm9vYmFy"}};
  for (const auto& [plain, encoded] : vectors) {
    EXPECT_EQ(base64_encode(std::string_view(plain)), encoded);
    auto d = base64_decode(encoded);
    ASSERT_TRUE(d.is_ok());
    EXPECT_EQ(as_string_view(d.value()), plain);
  }
}

TEST(Base64, RejectsMalformedInput) {
  EXPECT_FALSE(base64_decode("Zm9").is_ok());       // length
  EXPECT_FALSE(base64_decode("Zm9v!A==").is_ok());  // alphabet
  EXPECT_FALSE(base64_decode("Zh==").is_ok());      // non-canonical bits
  EXPECT_FALSE(base64_decode("Zm9v\nYg==").is_ok());
  EXPECT_TRUE(base64_decode("Zm9v\nYg==", true).is_ok());
  auto url = base64url_decode("_-8");
  ASSERT_TRUE(url.is_ok());
  EXPECT_EQ(url->size(), 2u);
  EXPECT_EQ(base64url_encode(url->data(), url->size()), "_-8");
}

TEST(Hex, RoundTripAndRejects) {
  Bytes b = {0x00, 0xab, 0xff};
  EXPECT_EQ(hex_encode(b), "00abff");
  EXPECT_EQ(hex_decode("00ABff").value(), b);
  EXPECT_FALSE(hex_decode("0").is_ok());
  EXPECT_FALSE(hex_decode("zz").is_ok());
}

TEST(Json, ParsesObjectsAndRejectsGarbage) {
  auto ok = parse_json_object(R"({"a":"b","n":5})");
  ASSERT_TRUE(ok.is_ok());
  EXPECT_EQ(json_string(ok.value(), "a", 10).value(), "b");
  EXPECT_EQ(json_int(ok.value(), "n", 0, 10).value(), 5);
  EXPECT_FALSE(json_int(ok.value(), "n", 6, 10).is_ok());
  EXPECT_FALSE(json_string(ok.value(), "missing", 10).is_ok());
  EXPECT_FALSE(json_string(ok.value(), "n", 10).is_ok());
  EXPECT_FALSE(json_string(ok.value(), "a", 0).is_ok());

  for (const char* bad : {"", "{", "[1,2]", "{\"a\":1} trailing", "{\"a\":1,\"a\":2}",
                          "{'a':1}", "{\"a\":1,}", "// c\n{}", "\xff\xfe"}) {
    auto r = parse_json_object(bad);
    EXPECT_FALSE(r.is_ok()) << bad;
    if (!r.is_ok()) {
      EXPECT_EQ(r.status().kind(), ErrorKind::kInvalidArgument);
    }
  }
  std::string deep(200, '[');
  EXPECT_FALSE(parse_json_object("{\"a\":" + deep + "}").is_ok());
  EXPECT_FALSE(parse_json_object(std::string(100, ' ') + "{}", 50).is_ok());
}

// The reader is made once per thread: a document that failed half way
// (errors, a nesting past the limit, a duplicate key) leaves nothing behind
// in the next parse, on this thread or another.
TEST(Json, AFailedParseLeavesNothingForTheNext) {
  const std::string deep = "{\"a\":" + std::string(200, '[') + "}";
  for (const std::string& bad : {deep, std::string("{\"a\":1,\"a\":2}"), std::string("{\"x\":[1,2,")}) {
    ASSERT_FALSE(parse_json_object(bad).is_ok()) << bad;
    auto next = parse_json_object(R"({"b":[true,{"c":"d"}]})");
    ASSERT_TRUE(next.is_ok()) << next.status().message();
    EXPECT_EQ(next->size(), 1u);
    EXPECT_EQ(next.value()["b"][1]["c"].asString(), "d");
    EXPECT_FALSE(next->isMember("a"));
  }
  std::thread other([] {
    EXPECT_FALSE(parse_json_object("{\"a\":" + std::string(200, '[') + "}").is_ok());
    auto r = parse_json_object(R"({"e":1})");
    ASSERT_TRUE(r.is_ok());
    EXPECT_EQ(r.value()["e"].asInt(), 1);
  });
  other.join();
  EXPECT_TRUE(parse_json_object(R"({"f":2})").is_ok());
}

// A document with every JSON type, nesting, every byte in strings and keys,
// and awkward numbers; the same seed is the same document.
Json::Value random_json(std::mt19937& rng, int depth) {
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<unsigned>(n)); };
  auto text = [&] {
    std::string s;
    int len = pick(12);
    for (int i = 0; i < len; ++i) s += static_cast<char>(pick(256));
    if (pick(3) == 0) s += "plain ascii, \"quoted\" and /slashed/";
    return to_utf8_lossy(s);  // JSON strings are UTF-8; other bytes: Json.WriterWritesOnlyUtf8
  };
  static const double kReals[] = {0.0, -0.0, 0.1, 3.0, -2.5e-7, 1e300, 123456789.125,
                                  std::numeric_limits<double>::infinity(),
                                  -std::numeric_limits<double>::infinity(), std::nan("")};
  int kind = depth >= 4 ? pick(6) : pick(8);
  switch (kind) {
    case 0: return Json::Value(Json::nullValue);
    case 1: return Json::Value(pick(2) == 0);
    case 2: return Json::Value(static_cast<Json::Int64>(rng()) - (pick(2) ? Json::Int64{1} << 40 : 0));
    case 3: return Json::Value(static_cast<Json::UInt64>(std::numeric_limits<uint64_t>::max() - rng()));
    case 4: return Json::Value(kReals[pick(10)]);
    case 5: return Json::Value(text());
    case 6: {
      Json::Value a(Json::arrayValue);
      for (int i = pick(6); i > 0; --i) a.append(random_json(rng, depth + 1));
      return a;
    }
    default: {
      Json::Value o(Json::objectValue);
      for (int i = pick(6); i > 0; --i) o[text()] = random_json(rng, depth + 1);
      return o;
    }
  }
}

TEST(Json, WriterMatchesJsoncppByteForByte) {
  // core's writer replaces jsoncpp's StreamWriter (no iostreams in the static
  // keygate); what it writes must not change.
  Json::StreamWriterBuilder compact;
  compact["indentation"] = "";
  compact["emitUTF8"] = true;
  Json::StreamWriterBuilder pretty;
  pretty["indentation"] = "  ";
  pretty["emitUTF8"] = true;
  std::mt19937 rng(20261203);
  for (int i = 0; i < 2000; ++i) {
    Json::Value doc = random_json(rng, 0);
    ASSERT_EQ(to_json(doc), Json::writeString(compact, doc)) << "document " << i;
    ASSERT_EQ(to_pretty_json(doc), Json::writeString(pretty, doc)) << "document " << i;
  }
  Json::Value nested(Json::objectValue);
  nested["a"]["b"] = Json::Value(Json::arrayValue);
  nested["a"]["b"].append(1);
  nested["a"]["b"].append(Json::Value(Json::objectValue));
  nested["c"] = "x\ny";
  EXPECT_EQ(to_json(nested), R"({"a":{"b":[1,{}]},"c":"x\ny"})");
  EXPECT_EQ(to_pretty_json(nested), Json::writeString(pretty, nested));
}

TEST(Crypto, HkdfRfc5869TestCase1) {
  auto ikm = SecretBuffer::allocate(22);
  memset(ikm->data(), 0x0b, 22);
  Bytes salt = hex_decode("000102030405060708090a0b0c").value();
  Bytes info = hex_decode("f0f1f2f3f4f5f6f7f8f9").value();
  auto okm = hkdf_sha256(ikm.value(), salt, as_string_view(info), 42);
  ASSERT_TRUE(okm.is_ok());
  EXPECT_EQ(hex_encode(okm->data(), okm->size()),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865");
}

TEST(Crypto, AesGcmDetectsEveryAlteredByte) {
  auto key = SecretBuffer::random(32);
  const char msg[] = "thirty-two bytes of volume key!";
  auto sealed = aes_gcm_seal(key.value(), reinterpret_cast<const uint8_t*>(msg), sizeof(msg), "aad");
  ASSERT_TRUE(sealed.is_ok());
  auto opened = aes_gcm_open(key.value(), sealed.value(), "aad");
  ASSERT_TRUE(opened.is_ok());
  EXPECT_EQ(memcmp(opened->data(), msg, sizeof(msg)), 0);
  for (size_t i = 0; i < sealed->size(); ++i) {
    Bytes altered = sealed.value();
    altered[i] ^= 0x01;
    auto r = aes_gcm_open(key.value(), altered, "aad");
    EXPECT_FALSE(r.is_ok()) << "byte " << i;
  }
  EXPECT_FALSE(aes_gcm_open(key.value(), sealed.value(), "other aad").is_ok());
  auto other = SecretBuffer::random(32);
  EXPECT_EQ(aes_gcm_open(other.value(), sealed.value(), "aad").status().kind(),
            ErrorKind::kIntegrity);
}

TEST(Crypto, CertificateFingerprintMatchesOpenssl) {
  std::ifstream in(std::string(KEYGATE_FIXTURES) + "/real/aws/cert-rsa2048-ap-southeast-2.pem");
  std::string pem((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto fp = certificate_sha256_fingerprint(pem);
  ASSERT_TRUE(fp.is_ok());
  // openssl x509 -in cert-rsa2048-ap-southeast-2.pem -noout -fingerprint -sha256
  EXPECT_EQ(fp.value(), "3c2fa3fa70c80bc64e5e934b30e2d0af1733cfd32584f68f86804c43a934833d");
  EXPECT_FALSE(certificate_sha256_fingerprint("not a cert").is_ok());
}

TEST(Args, ParsesOptionsAndRejectsUnknown) {
  auto a = Args::parse({"unlock", "--timeout", "5", "--server=https://a", "--server", "https://b",
                        "--verify-only", "dev"},
                       {"timeout", "server"}, {"verify-only"});
  ASSERT_TRUE(a.is_ok());
  EXPECT_EQ(a->positional(), (std::vector<std::string>{"unlock", "dev"}));
  EXPECT_EQ(a->get_all("server").size(), 2u);
  EXPECT_TRUE(a->has("verify-only"));
  EXPECT_EQ(a->get_int("timeout", 1, 1, 10).value(), 5);
  EXPECT_FALSE(a->get_int("timeout", 1, 6, 10).is_ok());
  EXPECT_FALSE(Args::parse({"--verfy-only"}, {}, {"verify-only"}).is_ok());
  EXPECT_FALSE(Args::parse({"--timeout"}, {"timeout"}, {}).is_ok());
}

}  // namespace
TEST(Printable, EscapesEverythingATerminalWouldInterpret) {
  EXPECT_EQ(printable("volume-1 ok", 64), "volume-1 ok");
  // Escape sequences, newlines (forged log lines), DEL, non-ASCII, and the
  // escape character itself come out as \xNN.
  EXPECT_EQ(printable("\x1b[2J\nunlock released", 64), "\\x1b[2J\\x0aunlock released");
  EXPECT_EQ(printable(std::string("a\0b", 3), 64), "a\\x00b");
  EXPECT_EQ(printable("\x7f\xc3\xa9\\", 64), "\\x7f\\xc3\\xa9\\x5c");
  // Bounded by input bytes, and says it was cut.
  EXPECT_EQ(printable(std::string(100, 'x'), 10), std::string(10, 'x') + "...");
  EXPECT_EQ(printable("", 10), "");
}

TEST(Utf8, AcceptsWellFormedAndRefusesTheRest) {
  for (const char* ok : {"", "ascii", "caf\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x94\x91", "\xef\xbf\xbd",
                         "\xf4\x8f\xbf\xbf"}) {
    EXPECT_TRUE(is_utf8(ok)) << printable(ok, 64);
  }
  for (const char* bad : {"\xff\xfe", "\x80", "\xc3", "\xc0\xaf" /* overlong '/' */,
                          "\xe0\x80\xaf", "\xed\xa0\x80" /* surrogate */, "\xf4\x90\x80\x80" /* > U+10FFFF */,
                          "\xf8\x88\x80\x80\x80", "ok\xe2\x82"}) {
    EXPECT_FALSE(is_utf8(bad)) << printable(bad, 64);
  }
  EXPECT_EQ(to_utf8_lossy("a\xff\xfe" "b\xc3\xa9"), "a\xef\xbf\xbd\xef\xbf\xbd" "b\xc3\xa9");
  EXPECT_EQ(to_utf8_lossy("\xe2\x82"), "\xef\xbf\xbd\xef\xbf\xbd");
  // Text for people: no C0, DEL or C1 control, however encoded.
  EXPECT_TRUE(is_display_text("db volume, caf\xc3\xa9 \xf0\x9f\x94\x91"));
  for (const char* bad : {"a\nb", "\x1b[31m", "\x7f", "\xc2\x9b" /* C1 CSI */, "\xff"}) {
    EXPECT_FALSE(is_display_text(bad)) << printable(bad, 64);
  }
}

TEST(Json, WriterWritesOnlyUtf8) {
  // Bytes that are not UTF-8 (a store written before input was checked)
  // come out as U+FFFD, so strict parsers read every document written.
  Json::Value doc(Json::objectValue);
  doc["description"] = std::string("\xff\xfe" "db");
  const std::string text = to_json(doc);
  EXPECT_EQ(text, "{\"description\":\"\xef\xbf\xbd\xef\xbf\xbd" "db\"}");
  EXPECT_TRUE(is_utf8(text));
  EXPECT_TRUE(parse_json_object(text).is_ok());
}

TEST(Json, ReaderRefusesWhatIsNotUtf8) {
  auto raw = parse_json_object("{\"description\":\"\xff\xfe\"}");
  ASSERT_FALSE(raw.is_ok());
  EXPECT_EQ(raw.status().message(), "malformed JSON: not UTF-8");
  // A \\u escape of a lone surrogate decodes to bytes that are not UTF-8.
  auto escaped = parse_json_object(R"({"a":"\udc00","b":"\u00e9"})");
  ASSERT_TRUE(escaped.is_ok()) << escaped.status().message();
  auto a = json_string(escaped.value(), "a", 16);
  ASSERT_FALSE(a.is_ok());
  EXPECT_EQ(a.status().message(), "field 'a' is not UTF-8");
  EXPECT_EQ(json_string(escaped.value(), "b", 16).value(), "\xc3\xa9");
  // Display text refuses control characters, escaped or not.
  auto ctl = parse_json_object(R"({"d":"ok\u001b[2J","e":"fine"})");
  ASSERT_TRUE(ctl.is_ok());
  EXPECT_EQ(json_optional_text(ctl.value(), "d", 64).status().message(),
            "field 'd' holds a control character");
  EXPECT_EQ(json_optional_text(ctl.value(), "e", 64).value(), "fine");
  EXPECT_EQ(json_optional_text(ctl.value(), "missing", 64).value(), "");
}

}  // namespace keygate
