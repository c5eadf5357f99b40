// libFuzzer target: the policy file (server/policy_file.h), which the
// server reads at start and on every SIGHUP. A file that loads must
// evaluate without a crash for any identity and time, and every error must
// name a line.
#include <cstdint>
#include <cstdlib>

#include "server/policy_file.h"
#include "tests/fuzz/fuzz_fixtures.h"

using namespace keygate;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto set = server::parse_policy_file(fuzz::text_of(data, size), "p.json");
  if (!set.is_ok()) {
    if (set.status().message().rfind("p.json:", 0) != 0) abort();
    return 0;
  }
  const server::Identity identity{"aws", {{"account_id", "123456789012"}, {"region", "eu-west-1"}}};
  for (const auto& [name, policy] : set->policies) {
    if (!server::is_policy_name(name)) abort();
    for (int64_t t : {int64_t{0}, int64_t{-1}, int64_t{1764579600}, INT64_MAX, INT64_MIN}) {
      (void)server::evaluate_named_policy(policy, identity, t);
    }
  }
  return 0;
}
