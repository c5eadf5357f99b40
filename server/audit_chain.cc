#include "server/audit_chain.h"

#include <ctime>

#include "core/crypto.h"
#include "core/json.h"

namespace keygate::server {

namespace {

constexpr char kDomain[] = "keygate-audit-v1";
constexpr size_t kMaxRecordLine = 1 << 20;

void put_u64(std::string& out, uint64_t v) {
  for (int shift = 56; shift >= 0; shift -= 8) out.push_back(static_cast<char>((v >> shift) & 0xff));
}
void put_field(std::string& out, std::string_view field) {
  put_u64(out, field.size());
  out.append(field);
}

std::string utc(int64_t t) {
  char when[32];
  time_t tt = static_cast<time_t>(t);
  struct tm tm_utc;
  if (gmtime_r(&tt, &tm_utc) == nullptr) return str_cat("@", t);
  strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm_utc);
  return when;
}

Status broken(const AuditRecord& r, const std::string& what) {
  return Status::error(ErrorKind::kIntegrity, str_cat(describe_audit_record(r), ": ", what));
}

Result<Bytes> hash_member(const Json::Value& obj, const char* key) {
  auto text = json_string(obj, key, 2 * kAuditHashSize);
  if (!text.is_ok()) return text.status();
  auto bytes = hex_decode(text.value());
  if (!bytes.is_ok() || bytes->size() != kAuditHashSize) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("field '", key, "' is not 64 hex digits"));
  }
  return bytes;
}

}  // namespace

Bytes audit_genesis_hash() { return Bytes(kAuditHashSize, 0); }

Bytes audit_record_hash(int64_t seq, const AuditEvent& e, const Bytes& prev_hash) {
  std::string encoded;
  encoded.reserve(128 + e.event.size() + e.outcome.size() + e.volume_id.size() + e.peer.size() +
                  e.detail.size());
  put_field(encoded, kDomain);
  put_u64(encoded, static_cast<uint64_t>(seq));
  put_u64(encoded, static_cast<uint64_t>(e.time));
  put_field(encoded, e.event);
  put_field(encoded, e.outcome);
  put_field(encoded, e.volume_id);
  put_field(encoded, e.peer);
  put_field(encoded, e.detail);
  put_field(encoded, as_string_view(prev_hash));
  return sha256(encoded);
}

AuditRecord chain_audit_record(const AuditRecord* head, int64_t seq, AuditEvent event) {
  for (std::string* field : {&event.event, &event.outcome, &event.volume_id, &event.peer, &event.detail}) {
    if (!is_utf8(*field)) *field = to_utf8_lossy(*field);
  }
  AuditRecord r;
  r.seq = seq;
  r.prev_hash = head != nullptr ? head->hash : audit_genesis_hash();
  r.hash = audit_record_hash(seq, event, r.prev_hash);
  r.event = std::move(event);
  return r;
}

std::string audit_record_json(const AuditRecord& r) {
  Json::Value v(Json::objectValue);
  v["seq"] = Json::Int64(r.seq);
  v["time"] = Json::Int64(r.event.time);
  v["event"] = r.event.event;
  v["outcome"] = r.event.outcome;
  v["volume_id"] = r.event.volume_id;
  v["peer"] = r.event.peer;
  v["detail"] = r.event.detail;
  v["prev"] = hex_encode(r.prev_hash);
  v["hash"] = hex_encode(r.hash);
  return to_json(v);
}

Result<AuditRecord> parse_audit_record_json(std::string_view line) {
  auto v = parse_json_object(line, kMaxRecordLine);
  if (!v.is_ok()) return v.status();
  static const char* const kMembers[] = {"seq",  "time", "event", "outcome", "volume_id",
                                         "peer", "detail", "prev", "hash"};
  for (const std::string& name : v->getMemberNames()) {
    bool known = false;
    for (const char* m : kMembers) known = known || name == m;
    if (!known) {
      return Status::error(ErrorKind::kInvalidArgument, str_cat("unknown field '", printable(name, 64), "'"));
    }
  }
  AuditRecord r;
  auto seq = json_int(v.value(), "seq", 1, INT64_MAX);
  if (!seq.is_ok()) return seq.status();
  r.seq = seq.value();
  auto time = json_int(v.value(), "time", INT64_MIN, INT64_MAX);
  if (!time.is_ok()) return time.status();
  r.event.time = time.value();
  struct {
    const char* key;
    std::string* field;
  } texts[] = {{"event", &r.event.event},
               {"outcome", &r.event.outcome},
               {"volume_id", &r.event.volume_id},
               {"peer", &r.event.peer},
               {"detail", &r.event.detail}};
  for (const auto& t : texts) {
    auto s = json_string(v.value(), t.key, kMaxRecordLine);
    if (!s.is_ok()) return s.status();
    *t.field = std::move(s).value();
  }
  auto prev = hash_member(v.value(), "prev");
  if (!prev.is_ok()) return prev.status();
  r.prev_hash = std::move(prev).value();
  auto hash = hash_member(v.value(), "hash");
  if (!hash.is_ok()) return hash.status();
  r.hash = std::move(hash).value();
  return r;
}

std::string describe_audit_record(const AuditRecord& r) {
  return str_cat("record ", r.seq, " (", utc(r.event.time), " ", printable(r.event.event, 64), " ",
                 printable(r.event.outcome, 32),
                 r.event.volume_id.empty() ? "" : " volume ", printable(r.event.volume_id, 64), ")");
}

Result<AuditHead> parse_audit_head(std::string_view text) {
  const size_t colon = text.find(':');
  auto bad = [&] {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("head '", printable(text, 200), "': use SEQ:HASH as 'audit verify' prints it"));
  };
  if (colon == std::string_view::npos || colon == 0 || colon > 18) return bad();
  AuditHead head;
  for (char c : text.substr(0, colon)) {
    if (c < '0' || c > '9') return bad();
    head.seq = head.seq * 10 + (c - '0');
  }
  auto hash = hex_decode(text.substr(colon + 1));
  if (head.seq < 1 || !hash.is_ok() || hash->size() != kAuditHashSize) return bad();
  head.hash = std::move(hash).value();
  return head;
}

std::string format_audit_head(const AuditRecord& r) { return str_cat(r.seq, ":", hex_encode(r.hash)); }

Status AuditChainVerifier::add(const AuditRecord& r) {
  if (!broken_.is_ok()) return broken_;
  Status s = [&]() -> Status {
    const int64_t want_seq = count_ == 0 ? 1 : head_.seq + 1;
    if (r.seq != want_seq) {
      if (r.seq < want_seq) return broken(r, str_cat("follows record ", head_.seq, ": out of order"));
      const std::string missing = want_seq == r.seq - 1
                                      ? str_cat("record ", want_seq, " is missing")
                                      : str_cat("records ", want_seq, " to ", r.seq - 1, " are missing");
      if (count_ == 0) return broken(r, "the trail starts here; " + missing);
      return broken(r, str_cat("follows record ", head_.seq, "; ", missing));
    }
    const Bytes& want_prev = count_ == 0 ? audit_genesis_hash() : head_.hash;
    if (r.prev_hash != want_prev) {
      return broken(r, count_ == 0 ? "the first record does not start the chain"
                                   : str_cat("its link does not match record ", head_.seq,
                                             ": a record was changed, removed or moved before it"));
    }
    if (audit_record_hash(r.seq, r.event, r.prev_hash) != r.hash) {
      return broken(r, "its content does not match its hash: the record was changed");
    }
    if (expected_ && expected_->seq == r.seq) {
      if (expected_->hash != r.hash) {
        return broken(r, "is not the record of the head given: the trail was rewritten up to here");
      }
      expected_seen_ = true;
    }
    return Status::ok();
  }();
  if (!s.is_ok()) {
    broken_ = s;
    return s;
  }
  ++count_;
  head_ = r;
  return Status::ok();
}

Status AuditChainVerifier::finish() const {
  if (!broken_.is_ok()) return broken_;
  if (expected_ && !expected_seen_) {
    return Status::error(ErrorKind::kIntegrity,
                         str_cat("the trail ends at record ", count_ == 0 ? 0 : head_.seq,
                                 ", before the head given (record ", expected_->seq,
                                 "): records were removed from its end"));
  }
  return Status::ok();
}

}  // namespace keygate::server
