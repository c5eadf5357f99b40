// libFuzzer target: the key server's request bodies, every endpoint, as the
// HTTPS front hands them to KeyService (on the real SQLite store, in
// memory, with the real AWS, GCP and Azure trust fixtures). The first byte
// picks the endpoint; every "@NONCE@" in the body becomes a fresh
// challenge's nonce, so the fuzzer reaches past the nonce check into the
// evidence, token, policy (a policy file with approvals and max_releases)
// and TPM paths. Any crash, sanitizer report or
// exception out of KeyService is a finding; so is a 200 that carries no
// answer, or an answer that is neither 200 nor an error body.
#include <cstdint>
#include <unistd.h>

#include <cstdlib>
#include <memory>

#include "core/crypto.h"
#include "core/json.h"
#include "core/log.h"
#include "core/protocol.h"
#include "server/key_service.h"
#include "tests/fuzz/fuzz_fixtures.h"

using namespace keygate;
using namespace keygate::server;

namespace {

constexpr int64_t kNow = 1771203600;  // inside the AWS document's certificate's validity
// The fixtures' volumes (tests/fuzz/make_seeds.py uses the same ids).
constexpr char kAwsVolume[] = "00000000-0000-4000-8000-000000000001";
constexpr char kTpmVolume[] = "00000000-0000-4000-8000-000000000002";
constexpr char kPendingVolume[] = "00000000-0000-4000-8000-000000000003";
// Under the policy file's "held" (manual approval) and "twice" (max_releases).
constexpr char kHeldVolume[] = "00000000-0000-4000-8000-000000000004";
constexpr char kCountedVolume[] = "00000000-0000-4000-8000-000000000005";
constexpr char kPolicies[] = R"({"policies": {
  "held": {"platform": "aws", "require": {"account_id": "189292791360"}, "approval": "manual", "approvers": 2},
  "twice": {"platform": "aws", "require": {"account_id": "189292791360"}, "max_releases": {"count": 2, "period": 60}}}})";
constexpr char kToken[] = "kgt_fuzztoken";
// Fresh state now and then: the store and the nonce table grow with
// every registration and challenge.
constexpr int kRunsPerService = 4000;

struct World {
  std::unique_ptr<Store> store;
  EvidenceTrust trust;
  FixedClock clock{kNow};
  std::unique_ptr<KeyService> service;
  PolicyRegistry policies;
  int runs = 0;
};

World* g_world = nullptr;

void add_volume(Store& store, const SecretBuffer& kek, const std::string& id, VolumeState state,
                bool tpm, const std::string& named = "") {
  VolumePolicy policy;
  policy.named_policy = named;
  policy.platform = "aws";
  policy.require = {{"account_id", "189292791360"}, {"region", "ap-southeast-2"},
                    {"instance_id", "i-0c5541936caf78c12"}};
  if (tpm) {
    TpmPolicy t;
    t.ak_public = to_bytes(fuzz::fixture("tpm/gce-cos85.ak.tpmt_public.bin"));
    t.pcrs[0] = {Bytes(32, 0)};
    t.pcrs[7] = {Bytes(32, 7)};
    policy.tpm = t;
  }
  auto secret = SecretBuffer::random(api::kVolumeSecretSize).value();
  VolumeRecord record{id, state, to_json(policy.to_json()),
                      seal_volume_secret(kek, secret, id).value(), "fuzz", kNow, kNow};
  if (!store.insert_volume(record).is_ok()) abort();
}

void fresh_service(World& w) {
  w.service.reset();
  auto store = open_sqlite_store(":memory:");
  if (!store.is_ok()) abort();
  w.store = std::move(store).value();
  auto kek = SecretBuffer::random(32).value();
  add_volume(*w.store, kek, kAwsVolume, VolumeState::kActive, false);
  add_volume(*w.store, kek, kTpmVolume, VolumeState::kActive, true);
  add_volume(*w.store, kek, kPendingVolume, VolumeState::kPending, false);
  add_volume(*w.store, kek, kHeldVolume, VolumeState::kActive, false, "held");
  add_volume(*w.store, kek, kCountedVolume, VolumeState::kActive, false, "twice");
  EnrollmentTemplate tmpl;
  tmpl.require = {{"account_id", "189292791360"}};
  if (!w.store->create_enrollment_token(sha256(std::string_view(kToken)), to_json(tmpl.to_json()),
                                        kNow + 86400, 1 << 30,
                                        AuditEvent{kNow, "token.create", "ok", "", "local", "fuzz fixture"})
           .is_ok()) {
    abort();
  }
  ServiceOptions options;
  options.per_source = RateLimit{0, 1};  // off: every input is served
  options.per_instance = RateLimit{0, 1};
  EnrollmentTemplate rule;
  rule.platform = "gcp";
  rule.require = {{"project_id", "rhsm-fuzz"}};
  options.attestation_enrollment = {rule};
  options.policies = &w.policies;
  w.service = std::make_unique<KeyService>(*w.store, std::move(kek), w.trust, w.clock, options);
  w.runs = 0;
}

std::string with_nonces(std::string body, KeyService& service) {
  const std::string marker = "@NONCE@";
  for (size_t at = body.find(marker); at != std::string::npos; at = body.find(marker, at)) {
    ApiResponse c = service.challenge("203.0.113.7");
    if (c.status != 200) abort();
    const std::string nonce = c.body[api::field::kNonce].asString();
    body.replace(at, marker.size(), nonce);
    at += nonce.size();
  }
  return body;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Refusals are logged as warnings: thousands a second would drown the
  // fuzzer's own output. Errors (a store failure) still show.
  log_init("keygate-server", LogSink::kStderr, LogLevel::kError);
  g_world = new World;
  World& w = *g_world;
  if (!w.trust.aws.add_pem("ap-southeast-2", fuzz::fixture("aws/cert-rsa2048-ap-southeast-2.pem"))
           .is_ok() ||
      !w.trust.gcp.add_file(std::string(KEYGATE_FIXTURES) + "/gcp/jwks-6a8ba565.json").is_ok()) {
    abort();
  }
  for (const char* f : {"root-baltimore-cybertrust.pem", "root-digicert-global-root-g2.pem",
                        "intermediate-microsoft-rsa-tls-ca-01.pem",
                        "intermediate-microsoft-azure-tls-issuing-ca-05.pem"}) {
    if (!w.trust.azure.add_pem(fuzz::fixture(std::string("azure/") + f), f).is_ok()) abort();
  }
  char path[] = "/tmp/keygate-fuzz-policy-XXXXXX";
  const int fd = mkstemp(path);
  if (fd < 0 || write(fd, kPolicies, sizeof kPolicies - 1) != static_cast<ssize_t>(sizeof kPolicies - 1)) abort();
  close(fd);
  if (!w.policies.load(path).is_ok()) abort();
  unlink(path);
  fresh_service(w);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0 || size > api::kMaxRequestBody + 1) return 0;  // the front refuses larger bodies
  World& w = *g_world;
  if (++w.runs > kRunsPerService) fresh_service(w);
  const std::string body = with_nonces(std::string(fuzz::text_of(data + 1, size - 1)), *w.service);
  const std::string peer = "203.0.113.7";
  ApiResponse r;
  switch (data[0] % 5) {
    case 0: r = w.service->unlock(body, peer); break;
    case 1: r = w.service->enroll_register(body, peer); break;
    case 2: r = w.service->enroll_confirm(body, peer); break;
    case 3: r = w.service->enroll_abandon(body, peer); break;
    default: r = w.service->challenge(peer); break;
  }
  // Every answer is an object; every refusal carries an error code.
  if (!r.body.isObject()) abort();
  // A wait names its request; anything else that is not a 200 is an error.
  if (r.status == 202) {
    if (!is_approval_id(r.body[api::field::kApproval][api::field::kRequestId].asString())) abort();
  } else if (r.status != 200 && !r.body[api::field::kError][api::field::kCode].isString()) {
    abort();
  }
  (void)to_json(r.body);  // what the front would send: must serialise
  return 0;
}
