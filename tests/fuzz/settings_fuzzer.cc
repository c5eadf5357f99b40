// libFuzzer target: the server's configuration file, including its
// enrollment-by-attestation rules. Any exception out of the JSON library
// (a value of the wrong type, out of range) is a finding: it once aborted
// the server.
#include <cstdint>

#include "server/settings.h"
#include "tests/fuzz/fuzz_fixtures.h"

using namespace keygate;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto s = server::parse_settings(fuzz::text_of(data, size));
  if (s.is_ok() && (s->nonce_ttl < 1 || s->nonce_ttl > 3600 || s->pending_ttl < 60)) abort();
  return 0;
}
