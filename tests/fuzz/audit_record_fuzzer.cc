// libFuzzer target: a line of an audit export (`audit verify --file` reads
// files an auditor was handed) and a head given on the command line. A line
// that parses must write back to the same record, and checking it must
// neither crash nor pass a record whose hash is not its own.
#include <cstdint>
#include <cstdlib>

#include "server/audit_chain.h"
#include "tests/fuzz/fuzz_fixtures.h"

using namespace keygate;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text = fuzz::text_of(data, size);
  (void)server::parse_audit_head(text);
  auto r = server::parse_audit_record_json(text);
  if (!r.is_ok()) return 0;
  auto again = server::parse_audit_record_json(server::audit_record_json(r.value()));
  if (!again.is_ok() || server::audit_record_json(again.value()) != server::audit_record_json(r.value())) abort();
  server::AuditChainVerifier verifier;
  const bool passed = verifier.add(r.value()).is_ok();
  if (passed && server::audit_record_hash(r->seq, r->event, r->prev_hash) != r->hash) abort();
  (void)server::describe_audit_record(r.value());
  return 0;
}
