// The audit trail's hash chain (server/audit_chain.h): its encoding, its
// JSON lines, and the verifier naming the first bad record for each way a
// trail is tampered with.
#include "server/audit_chain.h"

#include <gtest/gtest.h>

#include <vector>

namespace keygate::server {
namespace {

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

std::vector<AuditRecord> trail(int n) {
  std::vector<AuditRecord> out;
  for (int i = 1; i <= n; ++i) {
    out.push_back(chain_audit_record(out.empty() ? nullptr : &out.back(), i,
                                     AuditEvent{1764806400 + i, "unlock", "released", "vol-" + std::to_string(i),
                                                "127.0.0.1", "aws 123456789012 i-1"}));
  }
  return out;
}

// The first break the verifier reports over `records` (ok if none).
Status verify(const std::vector<AuditRecord>& records, std::optional<AuditHead> head = std::nullopt) {
  AuditChainVerifier v(std::move(head));
  for (const AuditRecord& r : records) {
    if (Status s = v.add(r); !s.is_ok()) return s;
  }
  return v.finish();
}

// The encoding is a format: exports and other implementations of the store
// hash the same bytes. These values were computed apart from this code
// (Python's hashlib over the encoding audit_chain.h documents).
TEST(AuditChain, HashIsTheDocumentedEncoding) {
  const AuditRecord first = chain_audit_record(
      nullptr, 1, AuditEvent{1764806400, "unlock", "released", "vol-1", "127.0.0.1", "aws 123 i-1"});
  EXPECT_EQ(hex_encode(first.prev_hash), std::string(64, '0'));
  EXPECT_EQ(hex_encode(first.hash), "c6d0005470beb702cf05ec4381da47d60a47c988f02c5d17bd439227cc722a5e");
  const AuditRecord second = chain_audit_record(&first, 2, AuditEvent{1764806401, "revoke", "ok", "vol-1", "local", ""});
  EXPECT_EQ(second.prev_hash, first.hash);
  EXPECT_EQ(hex_encode(second.hash), "e4e0a586a1ef4f259f91c64a1979f589000f8a9b24d009feecb2f13a102cb284");
}

// Length prefixes: moving bytes from one field to the next changes the hash.
TEST(AuditChain, FieldBoundariesAreHashed) {
  const Bytes prev = audit_genesis_hash();
  EXPECT_NE(audit_record_hash(1, AuditEvent{0, "ab", "c", "", "", ""}, prev),
            audit_record_hash(1, AuditEvent{0, "a", "bc", "", "", ""}, prev));
  EXPECT_NE(audit_record_hash(1, AuditEvent{0, "a", "", "", "", ""}, prev),
            audit_record_hash(2, AuditEvent{0, "a", "", "", "", ""}, prev));
}

// What is hashed is what an export can write: bytes that are not UTF-8 are
// replaced before hashing, so an exported record still verifies.
TEST(AuditChain, TextIsMadeUtf8BeforeItIsHashed) {
  const AuditRecord r = chain_audit_record(nullptr, 1, AuditEvent{5, "unlock", "refused", "v", "p", "bad \xff\xfe byte"});
  EXPECT_TRUE(is_utf8(r.event.detail));
  auto back = parse_audit_record_json(audit_record_json(r));
  ASSERT_TRUE(back.is_ok()) << back.status().message();
  EXPECT_TRUE(verify({back.value()}).is_ok());
}

TEST(AuditChain, JsonLineRoundTrips) {
  AuditRecord r = trail(1)[0];
  r.event.detail = "quote \" backslash \\ newline \n escape \x1b[2J nul " + std::string(1, '\0');
  r = chain_audit_record(nullptr, 1, r.event);
  const std::string line = audit_record_json(r);
  EXPECT_FALSE(contains(line, "\n"));
  auto back = parse_audit_record_json(line);
  ASSERT_TRUE(back.is_ok()) << back.status().message();
  EXPECT_EQ(back->seq, r.seq);
  EXPECT_EQ(back->event.detail, r.event.detail);
  EXPECT_EQ(back->hash, r.hash);
  EXPECT_EQ(back->prev_hash, r.prev_hash);
  EXPECT_TRUE(verify({back.value()}).is_ok());
}

TEST(AuditChain, MalformedJsonLinesAreRefusedByName) {
  const std::string good = audit_record_json(trail(1)[0]);
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    s.replace(s.find(from), from.size(), to);
    return parse_audit_record_json(s);
  };
  EXPECT_TRUE(contains(with("\"seq\":1", "\"seq\":0").status().message(), "seq"));
  EXPECT_TRUE(contains(with("\"seq\":1", "\"seq\":\"1\"").status().message(), "seq"));
  EXPECT_TRUE(contains(with("\"hash\":\"", "\"hash\":\"zz").status().message(), "hash"));
  EXPECT_TRUE(contains(with("\"prev\":\"00", "\"prev\":\"").status().message(), "prev"));
  EXPECT_TRUE(contains(with("{", "{\"extra\":1,").status().message(), "unknown field 'extra'"));
  EXPECT_TRUE(contains(with("\"peer\":\"127.0.0.1\",", "").status().message(), "peer"));
  EXPECT_FALSE(parse_audit_record_json("").is_ok());
  EXPECT_FALSE(parse_audit_record_json("[]").is_ok());
  EXPECT_FALSE(parse_audit_record_json(good + "x").is_ok());
  EXPECT_FALSE(parse_audit_record_json(std::string("{\"seq\":\xff}")).is_ok());
}

TEST(AuditChain, AnIntactTrailVerifies) {
  EXPECT_TRUE(verify({}).is_ok());
  const auto t = trail(20);
  AuditChainVerifier v;
  for (const auto& r : t) ASSERT_TRUE(v.add(r).is_ok());
  EXPECT_TRUE(v.finish().is_ok());
  EXPECT_EQ(v.count(), 20);
  EXPECT_EQ(v.head().seq, 20);
  EXPECT_EQ(format_audit_head(v.head()), "20:" + hex_encode(t.back().hash));
}

TEST(AuditChain, AnEditedRecordIsNamed) {
  auto t = trail(6);
  t[3].event.detail = "aws 999999999999 i-2";
  const Status s = verify(t);
  EXPECT_EQ(s.kind(), ErrorKind::kIntegrity);
  EXPECT_TRUE(contains(s.message(), "record 4 (")) << s.message();
  EXPECT_TRUE(contains(s.message(), "does not match its hash")) << s.message();
}

// An editor who also recomputes the record's own hash breaks the next link.
TEST(AuditChain, AnEditedAndRehashedRecordBreaksTheNextLink) {
  auto t = trail(6);
  t[3].event.outcome = "refused";
  t[3].hash = audit_record_hash(t[3].seq, t[3].event, t[3].prev_hash);
  const Status s = verify(t);
  EXPECT_TRUE(contains(s.message(), "record 5 (")) << s.message();
  EXPECT_TRUE(contains(s.message(), "does not match record 4")) << s.message();
}

TEST(AuditChain, ADeletedRecordIsNamed) {
  auto t = trail(6);
  t.erase(t.begin() + 2);
  Status s = verify(t);
  EXPECT_TRUE(contains(s.message(), "record 4 (")) << s.message();
  EXPECT_TRUE(contains(s.message(), "record 3 is missing")) << s.message();
  t = trail(6);
  t.erase(t.begin() + 1, t.begin() + 4);
  s = verify(t);
  EXPECT_TRUE(contains(s.message(), "records 2 to 4 are missing")) << s.message();
  t = trail(3);
  t.erase(t.begin());
  s = verify(t);
  EXPECT_TRUE(contains(s.message(), "the trail starts here; record 1 is missing")) << s.message();
}

// Renumbered to hide a deletion: the numbers agree, the links do not.
TEST(AuditChain, ARenumberedTrailIsFound) {
  auto t = trail(6);
  t.erase(t.begin() + 2);
  for (size_t i = 2; i < t.size(); ++i) t[i].seq = static_cast<int64_t>(i) + 1;
  const Status s = verify(t);
  EXPECT_TRUE(contains(s.message(), "record 3 (")) << s.message();
}

TEST(AuditChain, ReorderedRecordsAreFound) {
  auto t = trail(6);
  std::swap(t[2], t[3]);  // as read in order of position
  Status s = verify(t);
  EXPECT_TRUE(contains(s.message(), "record 4 (")) << s.message();
  EXPECT_TRUE(contains(s.message(), "record 3 is missing")) << s.message();
  t = trail(6);
  std::swap(t[2].seq, t[3].seq);  // numbers swapped too, read by number
  std::swap(t[2], t[3]);
  s = verify(t);
  EXPECT_TRUE(contains(s.message(), "record 3 (")) << s.message();
  EXPECT_TRUE(contains(s.message(), "volume vol-4)")) << s.message();
  EXPECT_TRUE(contains(s.message(), "does not match record 2")) << s.message();
}

TEST(AuditChain, AHeadKeptEarlierMustStillBeThere) {
  const auto t = trail(8);
  const AuditHead kept{6, t[5].hash};
  EXPECT_TRUE(verify(t, kept).is_ok());
  // Cut back: the end is intact in itself, but the kept head is gone.
  auto cut = t;
  cut.resize(4);
  Status s = verify(cut, kept);
  EXPECT_TRUE(contains(s.message(), "ends at record 4, before the head given (record 6)")) << s.message();
  // Rewritten whole from record 5 on, consistently: found at the head.
  auto rewritten = t;
  rewritten.resize(4);
  for (int i = 5; i <= 8; ++i) {
    rewritten.push_back(chain_audit_record(&rewritten.back(), i, AuditEvent{i, "unlock", "refused", "v", "p", ""}));
  }
  EXPECT_TRUE(verify(rewritten).is_ok());
  s = verify(rewritten, kept);
  EXPECT_TRUE(contains(s.message(), "record 6 (")) << s.message();
  EXPECT_TRUE(contains(s.message(), "rewritten")) << s.message();
}

TEST(AuditChain, HeadsParse) {
  const auto t = trail(3);
  auto head = parse_audit_head(format_audit_head(t[2]));
  ASSERT_TRUE(head.is_ok());
  EXPECT_EQ(head->seq, 3);
  EXPECT_EQ(head->hash, t[2].hash);
  for (const char* bad : {"", "3", ":abcd", "0:" /* seq 0 */, "x:00", "3:zz",
                          "3:00", "-1:0000000000000000000000000000000000000000000000000000000000000000",
                          "99999999999999999999:0000000000000000000000000000000000000000000000000000000000000000"}) {
    auto r = parse_audit_head(bad);
    EXPECT_FALSE(r.is_ok()) << bad;
    if (!r.is_ok()) {
      EXPECT_EQ(r.status().kind(), ErrorKind::kInvalidArgument);
    }
  }
  EXPECT_FALSE(parse_audit_head("0:" + std::string(64, '0')).is_ok());
}

// A record's words reach an error message escaped.
TEST(AuditChain, BrokenRecordsAreDescribedEscaped) {
  auto t = trail(2);
  t[1].event.event = "unlock\n\x1b[2J";
  const Status s = verify(t);
  for (unsigned char c : s.message()) EXPECT_TRUE(c >= 0x20 && c < 0x7f) << s.message();
}

}  // namespace
}  // namespace keygate::server
