// libFuzzer target: the keygate token JSON read from a LUKS2 header (any
// disk's header is untrusted until the volume opens). A token that parses
// must write back as JSON that parses to the same token.
#include <cstdint>

#include "core/json.h"
#include "tests/fuzz/fuzz_fixtures.h"
#include "unlocker/token.h"

using namespace keygate;
using namespace keygate::unlocker;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto token = KeygateToken::parse(fuzz::text_of(data, size));
  if (!token.is_ok()) return 0;
  const std::string again = to_json(token->to_json());
  auto reparsed = KeygateToken::parse(again);
  if (!reparsed.is_ok() || to_json(reparsed->to_json()) != again) abort();
  return 0;
}
