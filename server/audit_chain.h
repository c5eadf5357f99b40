// The audit trail as a hash chain. Each record carries the hash of the one
// before it, and its own hash covers its sequence number, its fields and
// that link, so a record edited, deleted or moved breaks the chain at that
// record (or at the one after it). The first record links to 32 zero bytes.
//
// The chain proves the trail was not changed by someone who did not also
// recompute every later hash. Against that, keep a head (`audit verify`
// prints it) somewhere the store's writers cannot reach, and verify that the
// trail still holds it (`audit verify --head SEQ:HASH`): a trail cut back or
// rewritten before that head is then found too.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "core/encoding.h"
#include "core/status.h"
#include "server/store.h"

namespace keygate::server {

constexpr size_t kAuditHashSize = 32;

// The link of the first record.
Bytes audit_genesis_hash();

// SHA-256 over a length-prefixed encoding of ("keygate-audit-v1", seq, time,
// event, outcome, volume_id, peer, detail, prev_hash): no two records
// encode alike.
Bytes audit_record_hash(int64_t seq, const AuditEvent& event, const Bytes& prev_hash);

// The record that follows `head` (nullptr: the trail is empty) with number
// `seq`. Its text fields are made UTF-8 first (what is hashed is what an
// export writes).
AuditRecord chain_audit_record(const AuditRecord* head, int64_t seq, AuditEvent event);

// One record as a JSON line (no newline): seq, time, event, outcome,
// volume_id, peer, detail, prev and hash (lowercase hex).
std::string audit_record_json(const AuditRecord& record);
// The inverse of audit_record_json: every member present, of its type, and
// no other; the hashes 64 hex digits.
Result<AuditRecord> parse_audit_record_json(std::string_view line);

// A record's identity for an error message: "record 17 (2026-12-04T10:00:00Z
// unlock released volume vol-...)", escaped for a terminal.
std::string describe_audit_record(const AuditRecord& record);

// A head kept from an earlier `audit verify`: record `seq` had hash `hash`.
struct AuditHead {
  int64_t seq = 0;
  Bytes hash;
};
// Parses "SEQ:HASH" (as `audit verify` prints a head).
Result<AuditHead> parse_audit_head(std::string_view text);
std::string format_audit_head(const AuditRecord& record);

// Checks records fed in order. The first break is kept and named; records
// after it are not checked (every one of them would fail).
class AuditChainVerifier {
 public:
  // `expected`, if given, must still be in the chain.
  explicit AuditChainVerifier(std::optional<AuditHead> expected = std::nullopt)
      : expected_(std::move(expected)) {}

  // kRefused (the chain is broken at this record) or ok.
  Status add(const AuditRecord& record);
  // After the last record: ok, or the first break.
  Status finish() const;

  int64_t count() const { return count_; }
  // The last record checked (valid when count() > 0).
  const AuditRecord& head() const { return head_; }

 private:
  Status broken_;
  int64_t count_ = 0;
  AuditRecord head_;
  std::optional<AuditHead> expected_;
  bool expected_seen_ = false;
};

}  // namespace keygate::server
