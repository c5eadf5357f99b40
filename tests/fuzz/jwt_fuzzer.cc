// libFuzzer target: GCP identity tokens (JWTs) and JWK sets. The bytes are
// verified as a token against Google's real keys (at a time inside the
// real token's validity), and loaded as a JWK set; a set that loads is
// then used to verify the real token (which must fail unless the set holds
// Google's key).
#include <cstdint>

#include "server/gcp_identity.h"
#include "tests/fuzz/fuzz_fixtures.h"

using namespace keygate;
using namespace keygate::server;

namespace {

JwkSet* g_keys = nullptr;
std::string* g_token = nullptr;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_keys = new JwkSet;
  if (!g_keys->add_json(fuzz::fixture("gcp/jwks-6a8ba565.json")).is_ok()) abort();
  g_token = new std::string(fuzz::trimmed(fuzz::fixture("gcp/rhsm-2021.identity.jwt")));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 64 * 1024) return 0;
  const std::string_view text = fuzz::text_of(data, size);
  const FixedClock clock(1616596223 + 30);
  GcpTokenCheck check;
  check.audience = "https://subscription.rhsm.redhat.com:443/subscription";
  auto id = verify_gcp_identity_token(text, *g_keys, clock, check);
  if (id.is_ok() && (text != *g_token || id->platform != "gcp")) abort();
  JwkSet keys;
  if (keys.add_json(text).is_ok()) (void)verify_gcp_identity_token(*g_token, keys, clock, check);
  return 0;
}
