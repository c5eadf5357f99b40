// KeyService on the in-memory store, the real AWS evidence fixture and a
// fixed clock: every refusal code the service answers, each one audited,
// and no key out while the audit trail cannot take its release. No server,
// no files; milliseconds.
#include "server/key_service.h"

#include <gtest/gtest.h>

#include <cctype>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <functional>
#include <map>
#include <set>

#include "core/crypto.h"
#include "core/envelope.h"
#include "core/json.h"
#include "core/protocol.h"
#include "tests/memory_store.h"
#include "tests/test_files.h"

namespace keygate::server {
namespace {

using test_files::read_file;
using Op = MemoryStore::Op;

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}
void write_file(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

constexpr int64_t kNow = 1771203600;  // inside the AWS document's certificate's validity
const std::string kAws = test_files::kRealFixtures + "aws/";
// The fixture's instance (ap-southeast-2.document.json).
constexpr char kAccount[] = "189292791360";
constexpr char kInstance[] = "i-0c5541936caf78c12";

class KeyServiceTest : public ::testing::Test {
 public:
  void SetUp() override {
    ASSERT_TRUE(trust_.aws
                    .add_pem("ap-southeast-2", read_file(kAws + "cert-rsa2048-ap-southeast-2.pem"))
                    .is_ok());
    kek_ = SecretBuffer::random(32).value();
    ServiceOptions options;
    EnrollmentTemplate rule;
    rule.platform = "aws";
    rule.require = {{"account_id", kAccount}, {"image_id", "ami-0cbde744623b7506b"}};
    options.attestation_enrollment = {rule};
    options_ = options;
    restart_service(options);
    // A token with uses to spare for the tests that register.
    EnrollmentTemplate tmpl;
    tmpl.require = {{"account_id", kAccount}};
    ASSERT_TRUE(store_.create_enrollment_token(sha256(kToken), to_json(tmpl.to_json()), kNow + 86400, 1000,
                                               AuditEvent{kNow, "token.create", "ok", "", "local", "fixture"})
                    .is_ok());
  }
  static constexpr char kToken[] = "kgt_fixturetoken";

  // A registration the fixture's token admits, with the AWS evidence.
  Json::Value registration() {
    Json::Value req = attested_request();
    req[api::field::kEvidence] = aws_evidence();
    req[api::field::kEnrollmentToken] = kToken;
    return req;
  }

  void restart_service(const ServiceOptions& options) {
    service_ = std::make_unique<KeyService>(store_, SecretBuffer::copy_of(kek_.data(), 32).value(),
                                            trust_, clock_, options);
  }

  Json::Value aws_evidence(bool altered = false) {
    std::string b64 = read_file(kAws + "ap-southeast-2.rsa2048.b64");
    while (!b64.empty() && (b64.back() == '\n' || b64.back() == '\r')) b64.pop_back();
    if (altered) b64[b64.size() / 2] = b64[b64.size() / 2] == 'A' ? 'B' : 'A';
    Json::Value e;
    e[api::field::kAws][api::field::kAwsSignature] = b64;
    return e;
  }

  // A request body with a fresh challenge's nonce and a client key.
  Json::Value attested_request() {
    ApiResponse c = service_->challenge("peer");
    EXPECT_EQ(c.status, 200);
    Json::Value req;
    req[api::field::kNonce] = c.body[api::field::kNonce];
    keys_ = X25519KeyPair::generate().value();
    req[api::field::kClientPublicKey] =
        base64_encode(keys_.public_key.data(), keys_.public_key.size());
    return req;
  }

  Json::Value unlock_request(const std::string& volume_id) {
    Json::Value req = attested_request();
    req[api::field::kVolumeId] = volume_id;
    req[api::field::kEvidence] = aws_evidence();
    return req;
  }

  // A volume straight in the store, bound to `require` (the fixture's
  // instance by default).
  std::string add_volume(VolumeState state, std::map<std::string, std::string> require = {},
                         bool with_tpm = false, const std::string& named_policy = "") {
    VolumePolicy policy;
    policy.named_policy = named_policy;
    policy.platform = "aws";
    policy.require = require.empty() ? std::map<std::string, std::string>{{"account_id", kAccount},
                                                                          {"region", "ap-southeast-2"},
                                                                          {"instance_id", kInstance}}
                                     : require;
    if (with_tpm) {
      TpmPolicy tpm;
      tpm.ak_public = Bytes(64, 1);
      tpm.pcrs[7] = {Bytes(32, 0)};
      policy.tpm = tpm;
    }
    const std::string id = new_volume_id();
    auto secret = SecretBuffer::random(32).value();
    VolumeRecord record{id, state, to_json(policy.to_json()),
                        seal_volume_secret(kek_, secret, id).value(), "", clock_.now_unix(),
                        clock_.now_unix()};
    EXPECT_TRUE(store_.insert_volume(record).is_ok());
    secrets_[id] = std::move(secret);
    return id;
  }

  // An abandon call for `vid`, with the proof its secret gives.
  ApiResponse abandon(const std::string& vid) {
    Json::Value req;
    req[api::field::kVolumeId] = vid;
    req[api::field::kProof] = base64_encode(api::enrollment_abandonment(secrets_.at(vid), vid));
    return service_->enroll_abandon(to_json(req), "peer");
  }
  std::map<std::string, SecretBuffer> secrets_;  // each added volume's secret
  size_t expire_count() {
    size_t n = 0;
    for (const auto& e : audit()) n += e.event == "enroll.expire";
    return n;
  }

  ApiResponse unlock(const Json::Value& req) { return service_->unlock(to_json(req), "peer"); }

  // A policy file in effect with one policy, "held", that wants one approval
  // within 60 s; and a volume of the fixture's instance under it.
  std::string add_held_volume(const std::string& conditions = R"("approval": "manual", "approval_timeout": 60)") {
    // One file per process and call: ctest runs these tests in parallel.
    static std::atomic<int> made{0};
    const std::string file = str_cat(::testing::TempDir(), "/keygate-held-policy-", getpid(), "-", ++made, ".json");
    write_file(file, str_cat(R"({"policies": {"held": {"platform": "aws", "require": {"account_id": ")", kAccount,
                             R"("}, )", conditions, "}}}"));
    EXPECT_TRUE(policies_.load(file).is_ok());
    ServiceOptions o = options_;
    o.policies = &policies_;
    restart_service(o);
    return add_volume(VolumeState::kActive, {}, false, "held");
  }
  PolicyRegistry policies_;

  std::vector<AuditEvent> audit() { return store_.recent_audit(1000).value(); }
  // The trail's last event (a failure, and an empty event, if there is none).
  AuditEvent last_audit() {
    auto trail = audit();
    if (trail.empty()) {
      ADD_FAILURE() << "the audit trail is empty";
      return AuditEvent{};
    }
    return trail.back();
  }

  FixedClock clock_{kNow};
  ServiceOptions options_;
  EvidenceTrust trust_;
  MemoryStore store_;
  SecretBuffer kek_;
  X25519KeyPair keys_;
  std::unique_ptr<KeyService> service_;
};

std::string code_of(const ApiResponse& r) {
  return r.body[api::field::kError][api::field::kCode].asString();
}

TEST_F(KeyServiceTest, ReleasesToTheBoundInstanceAfterAuditingIt) {
  const std::string vid = add_volume(VolumeState::kActive);
  ApiResponse r = unlock(unlock_request(vid));
  ASSERT_EQ(r.status, 200) << to_json(r.body);
  auto wrapped = WrappedSecret::from_json(r.body[api::field::kWrapped]);
  ASSERT_TRUE(wrapped.is_ok());
  ASSERT_FALSE(audit().empty());
  EXPECT_EQ(last_audit().event, "unlock");
  EXPECT_EQ(last_audit().outcome, "released");
  EXPECT_EQ(last_audit().volume_id, vid);
}

// Every refusal a KeyService answers: its HTTP status, its code, and its
// line on the audit trail (outcome "refused", or "error" for the server's
// own failures). The table must name every code of core/protocol.h that
// KeyService answers.
struct RefusalCase {
  const char* name;
  int status;
  const char* code;
  const char* outcome;  // audit outcome; nullptr: the case is not audited (a challenge)
  std::function<ApiResponse(KeyServiceTest&)> run;
};

void PrintTo(const RefusalCase& c, std::ostream* os) { *os << c.name; }

std::vector<RefusalCase> refusal_cases() {
  auto as = [](KeyServiceTest& t) -> KeyServiceTest& { return t; };
  return {
      {"garbage body", 400, api::kErrBadRequest, "refused",
       [=](KeyServiceTest& t) { return as(t).service_->unlock("{not json", "peer"); }},
      {"control characters in the volume id", 400, api::kErrBadRequest, "refused",
       [=](KeyServiceTest& t) {
         Json::Value req = as(t).unlock_request("x");
         req[api::field::kVolumeId] = "\x1b[2J\n";
         return as(t).unlock(req);
       }},
      {"oversized body", 400, api::kErrTooLarge, "refused",
       [=](KeyServiceTest& t) {
         return as(t).service_->unlock(std::string(api::kMaxRequestBody + 1, ' '), "peer");
       }},
      {"nonce reused", 403, api::kErrNonceInvalid, "refused",
       [=](KeyServiceTest& t) {
         Json::Value req = as(t).unlock_request(as(t).add_volume(VolumeState::kActive));
         EXPECT_EQ(as(t).unlock(req).status, 200);
         return as(t).unlock(req);
       }},
      {"altered evidence", 403, api::kErrEvidenceInvalid, "refused",
       [=](KeyServiceTest& t) {
         Json::Value req = as(t).unlock_request(as(t).add_volume(VolumeState::kActive));
         req[api::field::kEvidence] = as(t).aws_evidence(true);
         return as(t).unlock(req);
       }},
      {"another instance's volume", 403, api::kErrPolicyDenied, "refused",
       [=](KeyServiceTest& t) {
         return as(t).unlock(as(t).unlock_request(as(t).add_volume(
             VolumeState::kActive,
             {{"account_id", kAccount}, {"region", "ap-southeast-2"}, {"instance_id", "i-0other"}})));
       }},
      {"unknown volume", 403, api::kErrPolicyDenied, "refused",
       [=](KeyServiceTest& t) { return as(t).unlock(as(t).unlock_request(new_volume_id())); }},
      {"revoked volume", 403, api::kErrRevoked, "refused",
       [=](KeyServiceTest& t) {
         return as(t).unlock(as(t).unlock_request(as(t).add_volume(VolumeState::kRevoked)));
       }},
      {"enrollment never confirmed", 403, api::kErrNotEnrolled, "refused",
       [=](KeyServiceTest& t) {
         return as(t).unlock(as(t).unlock_request(as(t).add_volume(VolumeState::kPending)));
       }},
      {"no TPM quote for a TPM-bound volume", 403, api::kErrTpmRequired, "refused",
       [=](KeyServiceTest& t) {
         return as(t).unlock(as(t).unlock_request(as(t).add_volume(VolumeState::kActive, {}, true)));
       }},
      {"unknown enrollment token", 403, api::kErrTokenInvalid, "refused",
       [=](KeyServiceTest& t) {
         Json::Value req = as(t).attested_request();
         req[api::field::kEnrollmentToken] = "kgt_nosuchtoken";
         return as(t).service_->enroll_register(to_json(req), "peer");
       }},
      {"no token and no evidence", 403, api::kErrTokenInvalid, "refused",
       [=](KeyServiceTest& t) {
         return as(t).service_->enroll_register(to_json(as(t).attested_request()), "peer");
       }},
      {"store fails", 500, api::kErrInternal, "error",
       [=](KeyServiceTest& t) {
         Json::Value req = as(t).unlock_request(as(t).add_volume(VolumeState::kActive));
         as(t).store_.fail(Op::kGetVolume, Status::error(ErrorKind::kIo, "store: disk I/O error"));
         return as(t).unlock(req);
       }},
      {"one instance unlocking faster than its rate", 429, api::kErrRateLimited, "refused",
       [=](KeyServiceTest& t) {
         ServiceOptions o = as(t).options_;
         o.per_instance = RateLimit{1, 1};
         as(t).restart_service(o);
         const std::string vid = as(t).add_volume(VolumeState::kActive);
         EXPECT_EQ(as(t).unlock(as(t).unlock_request(vid)).status, 200);
         ApiResponse r = as(t).unlock(as(t).unlock_request(vid));
         EXPECT_GE(r.retry_after_seconds, 1);
         return r;
       }},
      {"an approval request that does not exist", 403, api::kErrApprovalDenied, "refused",
       [=](KeyServiceTest& t) {
         Json::Value req = as(t).unlock_request(as(t).add_held_volume());
         req[api::field::kApprovalRequest] = "req-aaaaaaaaaaaa";
         return as(t).unlock(req);
       }},
      {"an approval request that is not a request id", 400, api::kErrBadRequest, "refused",
       [=](KeyServiceTest& t) {
         Json::Value req = as(t).unlock_request(as(t).add_held_volume());
         req[api::field::kApprovalRequest] = "req-\x1b[2J";
         return as(t).unlock(req);
       }},
      {"abandon of a confirmed volume", 409, api::kErrVolumeActive, "refused",
       [=](KeyServiceTest& t) { return as(t).abandon(as(t).add_volume(VolumeState::kActive)); }},
      {"too many outstanding challenges", 503, api::kErrBusy, nullptr,
       [=](KeyServiceTest& t) {
         as(t).store_.max_outstanding_nonces = 0;
         return as(t).service_->challenge("peer");
       }},
  };
}

class KeyServiceRefusal : public KeyServiceTest,
                          public ::testing::WithParamInterface<RefusalCase> {};

TEST_P(KeyServiceRefusal, IsAnsweredWithItsCodeAndAudited) {
  const RefusalCase& c = GetParam();
  const size_t before = audit().size();
  ApiResponse r = c.run(*this);
  EXPECT_EQ(r.status, c.status) << to_json(r.body);
  EXPECT_EQ(code_of(r), c.code);
  EXPECT_FALSE(r.body.isMember(api::field::kWrapped));
  auto trail = audit();
  if (c.outcome == nullptr) {
    EXPECT_EQ(trail.size(), before);
    return;
  }
  ASSERT_GT(trail.size(), before) << "not audited";
  EXPECT_EQ(trail.back().outcome, c.outcome);
  EXPECT_FALSE(trail.back().detail.empty()) << "the trail does not say why";
}

INSTANTIATE_TEST_SUITE_P(Cases, KeyServiceRefusal, ::testing::ValuesIn(refusal_cases()),
                         [](const ::testing::TestParamInfo<RefusalCase>& p) {
                           std::string id;
                           bool up = true;
                           for (const char* c = p.param.name; *c; ++c) {
                             if (!isalnum(static_cast<unsigned char>(*c))) {
                               up = true;
                               continue;
                             }
                             id += up ? static_cast<char>(toupper(*c)) : *c;
                             up = false;
                           }
                           return id;
                         });

TEST(KeyServiceRefusalTable, HasACaseForEveryCodeTheServiceAnswers) {
  std::set<std::string> covered = {api::kErrAuditUnavailable};  // its own tests, below
  for (const RefusalCase& c : refusal_cases()) covered.insert(c.code);
  for (const char* code : api::kServiceErrorCodes) {
    EXPECT_EQ(covered.count(code), 1u) << "no case for error code " << code;
  }
}

TEST_F(KeyServiceTest, NoKeyLeavesWhileTheAuditTrailCannotBeWritten) {
  const std::string vid = add_volume(VolumeState::kActive);
  Json::Value req = unlock_request(vid);
  store_.fail(Op::kAppendAudit, Status::error(ErrorKind::kIo, "store: database is locked"));
  ApiResponse r = unlock(req);
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(code_of(r), api::kErrAuditUnavailable);
  EXPECT_FALSE(r.body.isMember(api::field::kWrapped));
  // Once the trail takes writes again, the same volume opens (a new nonce).
  store_.fail(Op::kAppendAudit, Status::ok());
  EXPECT_EQ(unlock(unlock_request(vid)).status, 200);
  EXPECT_EQ(last_audit().outcome, "released");
}

TEST_F(KeyServiceTest, AnUnlockThatNeedsApprovalWaitsAndIsReleasedOnceWhenApproved) {
  const std::string vid = add_held_volume();
  ApiResponse r = unlock(unlock_request(vid));
  ASSERT_EQ(r.status, 202) << to_json(r.body);
  EXPECT_FALSE(r.body.isMember(api::field::kWrapped));
  const Json::Value& asked = r.body[api::field::kApproval];
  const std::string rid = asked[api::field::kRequestId].asString();
  EXPECT_TRUE(is_approval_id(rid)) << rid;
  EXPECT_EQ(asked["instance"].asString(), kInstance);
  EXPECT_EQ(asked["state"].asString(), "pending");
  EXPECT_EQ(last_audit().event, "approval.request");
  // Asking again (its own id, or none: a reboot) is the same request.
  Json::Value poll = unlock_request(vid);
  poll[api::field::kApprovalRequest] = rid;
  EXPECT_EQ(unlock(poll).body[api::field::kApproval][api::field::kRequestId].asString(), rid);
  EXPECT_EQ(unlock(unlock_request(vid)).body[api::field::kApproval][api::field::kRequestId].asString(), rid);
  EXPECT_EQ(store_.list_approvals(false, 10).value().size(), 1u);
  // Approved in the store, as the admin API does it: released once.
  auto record = store_.get_approval(rid).value();
  Approval approved = Approval::from_record(record).value();
  approved.state = "approved";
  approved.approvals.push_back({"bob", "ok", kNow});
  ASSERT_TRUE(store_.update_approval(record, approved.to_record(), AuditEvent{kNow, "approval.approve", "approved", vid, "-", ""}).is_ok());
  poll = unlock_request(vid);
  poll[api::field::kApprovalRequest] = rid;
  r = unlock(poll);
  ASSERT_EQ(r.status, 200) << to_json(r.body);
  EXPECT_EQ(last_audit().outcome, "released");
  EXPECT_TRUE(contains(last_audit().detail, "approved by bob (" + rid + ")")) << last_audit().detail;
  EXPECT_EQ(store_.get_approval(rid).value().state, "used");
  // Its id again: a new request, no second release.
  poll = unlock_request(vid);
  poll[api::field::kApprovalRequest] = rid;
  r = unlock(poll);
  EXPECT_EQ(r.status, 202);
  EXPECT_NE(r.body[api::field::kApproval][api::field::kRequestId].asString(), rid);
}

TEST_F(KeyServiceTest, AnApprovalRequestPastItsTimeIsDeniedToItsInstance) {
  const std::string vid = add_held_volume();
  const std::string rid = unlock(unlock_request(vid)).body[api::field::kApproval][api::field::kRequestId].asString();
  clock_.set(kNow + 61);
  Json::Value poll = unlock_request(vid);
  poll[api::field::kApprovalRequest] = rid;
  ApiResponse r = unlock(poll);
  EXPECT_EQ(r.status, 403);
  EXPECT_EQ(code_of(r), api::kErrApprovalDenied);
  EXPECT_EQ(store_.get_approval(rid).value().state, "expired");
  bool expired_on_trail = false;
  for (const auto& e : audit()) expired_on_trail |= e.event == "approval.expire" && e.outcome == "denied";
  EXPECT_TRUE(expired_on_trail);
  // A later boot (no id) asks afresh.
  r = unlock(unlock_request(vid));
  EXPECT_EQ(r.status, 202);
  EXPECT_NE(r.body[api::field::kApproval][api::field::kRequestId].asString(), rid);
}

TEST_F(KeyServiceTest, AnApprovalRequestIsNotMadeWithoutItsAuditRecord) {
  const std::string vid = add_held_volume();
  store_.fail(Op::kAppendAudit, Status::error(ErrorKind::kIo, "store: database is locked"));
  ApiResponse r = unlock(unlock_request(vid));
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(code_of(r), api::kErrAuditUnavailable);
  store_.fail(Op::kAppendAudit, Status::ok());
  EXPECT_TRUE(store_.list_approvals(false, 10).value().empty());
}

TEST_F(KeyServiceTest, MaxReleasesRefusesAnInstanceOnceItsPeriodsReleasesAreUsedUp) {
  const std::string vid = add_held_volume(R"("max_releases": {"count": 2, "period": 3600})");
  EXPECT_EQ(unlock(unlock_request(vid)).status, 200);
  clock_.advance_ms(1500);  // the per-instance rate limit
  EXPECT_EQ(unlock(unlock_request(vid)).status, 200);
  clock_.advance_ms(1500);
  ApiResponse r = unlock(unlock_request(vid));
  EXPECT_EQ(r.status, 403);
  EXPECT_EQ(code_of(r), api::kErrPolicyDenied);
  EXPECT_FALSE(r.body.isMember(api::field::kWrapped));
  EXPECT_EQ(last_audit().outcome, "refused");
  EXPECT_TRUE(contains(last_audit().detail, "policy held: 2 releases to instance i-0c5541936caf78c12 within the period"))
      << last_audit().detail;
  // An hour after the first: one more.
  clock_.set(kNow + 3601);
  EXPECT_EQ(unlock(unlock_request(vid)).status, 200);
  EXPECT_EQ(last_audit().outcome, "released");
}

TEST_F(KeyServiceTest, AnotherVolumesApprovalDoesNotOpenThisOne) {
  const std::string held = add_held_volume();
  const std::string other = add_volume(VolumeState::kActive, {}, false, "held");
  const std::string rid = unlock(unlock_request(held)).body[api::field::kApproval][api::field::kRequestId].asString();
  Json::Value poll = unlock_request(other);
  poll[api::field::kApprovalRequest] = rid;
  ApiResponse r = unlock(poll);
  EXPECT_EQ(r.status, 403);
  EXPECT_EQ(code_of(r), api::kErrApprovalDenied);
  EXPECT_TRUE(contains(last_audit().detail, "is for volume " + held)) << last_audit().detail;
}

TEST_F(KeyServiceTest, RegistrationWithoutAuditStoresNothingAndSpendsNoToken) {
  Json::Value req = registration();
  store_.fail(Op::kAppendAudit, Status::error(ErrorKind::kIo, "store: database is locked"));
  ApiResponse r = service_->enroll_register(to_json(req), "peer");
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(code_of(r), api::kErrAuditUnavailable);
  EXPECT_FALSE(r.body.isMember(api::field::kWrapped));
  EXPECT_TRUE(store_.list_volumes().value().empty());
}

TEST_F(KeyServiceTest, ADescriptionWithControlCharactersIsRefusedAndNothingIsStored) {
  // A description reaches volume lists and terminals: text only.
  for (const char* bad : {"\x1b[2J", "db\nunlock released volume=x", "\xc2\x9b" "31m"}) {
    Json::Value req = registration();
    req[api::field::kDescription] = bad;
    ApiResponse r = service_->enroll_register(to_json(req), "peer");
    EXPECT_EQ(r.status, 400) << printable(bad, 32);
    EXPECT_EQ(code_of(r), api::kErrBadRequest);
    EXPECT_NE(to_json(r.body).find("field 'description' holds a control character"), std::string::npos)
        << to_json(r.body);
  }
  EXPECT_TRUE(store_.list_volumes().value().empty());
  Json::Value req = registration();
  req[api::field::kDescription] = "db volume, caf\xc3\xa9";
  EXPECT_EQ(service_->enroll_register(to_json(req), "peer").status, 200);
  EXPECT_EQ(store_.list_volumes().value().at(0).description, "db volume, caf\xc3\xa9");
}

// A registration whose record cannot be written spends no use of its token:
// the same one-use token enrolls once the store takes writes again.
TEST_F(KeyServiceTest, AFailedRegistrationSpendsNoUseOfItsToken) {
  EnrollmentTemplate tmpl;
  tmpl.require = {{"account_id", kAccount}};
  ASSERT_TRUE(store_.create_enrollment_token(sha256("kgt_onetime"), to_json(tmpl.to_json()), kNow + 3600, 1,
                                             AuditEvent{kNow, "token.create", "ok", "", "local", "one use"})
                  .is_ok());
  auto with_token = [&] {
    Json::Value req = attested_request();
    req[api::field::kEvidence] = aws_evidence();
    req[api::field::kEnrollmentToken] = "kgt_onetime";
    return service_->enroll_register(to_json(req), "peer");
  };
  store_.fail(Op::kInsertVolume, Status::error(ErrorKind::kIo, "store: disk I/O error"));
  ApiResponse failed = with_token();
  EXPECT_EQ(failed.status, 503) << to_json(failed.body);
  EXPECT_FALSE(failed.body.isMember(api::field::kWrapped));
  store_.fail(Op::kInsertVolume, Status::ok());
  ApiResponse ok = with_token();
  ASSERT_EQ(ok.status, 200) << to_json(ok.body);
  EXPECT_EQ(last_audit().event, "enroll.register");
  EXPECT_EQ(last_audit().volume_id, ok.body[api::field::kVolumeId].asString());
  EXPECT_EQ(store_.list_volumes().value().size(), 1u);
  // Its one use is spent now.
  EXPECT_EQ(code_of(with_token()), api::kErrTokenInvalid);
}

// An AWS identity document is static and public copies exist: a rule for
// AWS admits no one, even the instance the real document names (the
// configuration refuses such a rule at start; this is the second lock).
TEST_F(KeyServiceTest, AnAwsAttestationRuleAdmitsNoOne) {
  Json::Value req = attested_request();
  req[api::field::kEvidence] = aws_evidence();
  ApiResponse r = service_->enroll_register(to_json(req), "peer");
  EXPECT_EQ(r.status, 403) << to_json(r.body);
  EXPECT_EQ(code_of(r), api::kErrTokenInvalid);
  EXPECT_TRUE(store_.list_volumes().value().empty());
  EnrollmentTemplate aws_rule;
  aws_rule.platform = "aws";
  aws_rule.require = {{"account_id", kAccount}};
  Status checked = check_attestation_rule(aws_rule);
  ASSERT_FALSE(checked.is_ok());
  EXPECT_NE(checked.message().find("static and copies of real ones are public"), std::string::npos)
      << checked.message();
  EnrollmentTemplate gcp_rule;
  gcp_rule.platform = "gcp";
  gcp_rule.require = {{"project_id", "p"}};
  EXPECT_TRUE(check_attestation_rule(gcp_rule).is_ok());
  gcp_rule.require = {{"zone", "us-central1-a"}};
  EXPECT_FALSE(check_attestation_rule(gcp_rule).is_ok());  // no project: any instance
}

TEST_F(KeyServiceTest, RegistersConfirmsAndUnlocks) {
  Json::Value req = registration();
  const Bytes nonce = base64_decode(req[api::field::kNonce].asString()).value();
  ApiResponse reg = service_->enroll_register(to_json(req), "peer");
  ASSERT_EQ(reg.status, 200) << to_json(reg.body);
  const std::string vid = reg.body[api::field::kVolumeId].asString();
  EXPECT_NE(last_audit().detail.find("by token"), std::string::npos) << last_audit().detail;
  auto secret = unwrap_secret(WrappedSecret::from_json(reg.body[api::field::kWrapped]).value(),
                              keys_, vid, nonce);
  ASSERT_TRUE(secret.is_ok()) << secret.status().message();
  // Pending until confirmed.
  EXPECT_EQ(code_of(unlock(unlock_request(vid))), api::kErrNotEnrolled);
  Json::Value confirm;
  confirm[api::field::kVolumeId] = vid;
  confirm[api::field::kProof] = base64_encode(api::enrollment_confirmation(secret.value(), vid));
  ApiResponse done = service_->enroll_confirm(to_json(confirm), "peer");
  ASSERT_EQ(done.status, 200) << to_json(done.body);
  EXPECT_EQ(unlock(unlock_request(vid)).status, 200);
}

// A registration that replaces a volume (keygate rotate) proves, over its
// own nonce, that it holds that volume's secret; confirming the new volume
// revokes the old one if it was this instance's alone, never an image
// group's (the group's other instances open it) nor another instance's.
TEST_F(KeyServiceTest, ARotationProvesTheOldSecretAndRetiresOnlyThisInstancesVolume) {
  auto replacing = [&](const std::string& id, const SecretBuffer& secret,
                       bool other_nonce = false) {
    Json::Value req = registration();
    Bytes nonce = base64_decode(req[api::field::kNonce].asString()).value();
    if (other_nonce) nonce[0] ^= 1;
    req[api::field::kRotates] = id;
    req[api::field::kRotatesProof] = base64_encode(api::rotation_proof(secret, id, nonce));
    return std::make_pair(service_->enroll_register(to_json(req), "peer"), req);
  };
  auto confirm = [&](const ApiResponse& reg, const Json::Value& req) {
    const std::string vid = reg.body[api::field::kVolumeId].asString();
    const Bytes nonce = base64_decode(req[api::field::kNonce].asString()).value();
    auto secret = unwrap_secret(WrappedSecret::from_json(reg.body[api::field::kWrapped]).value(),
                                keys_, vid, nonce);
    EXPECT_TRUE(secret.is_ok());
    Json::Value c;
    c[api::field::kVolumeId] = vid;
    c[api::field::kProof] = base64_encode(api::enrollment_confirmation(secret.value(), vid));
    return service_->enroll_confirm(to_json(c), "peer");
  };
  const std::string old = add_volume(VolumeState::kActive);
  const auto stranger = SecretBuffer::random(32).value();
  // Not holding the old secret, or a proof over another nonce: refused,
  // nothing stored.
  for (bool replay : {false, true}) {
    ApiResponse r = replacing(old, replay ? secrets_.at(old) : stranger, replay).first;
    EXPECT_EQ(r.status, 403);
    EXPECT_EQ(code_of(r), api::kErrPolicyDenied);
    EXPECT_TRUE(
        contains(last_audit().detail, "rotation proof for volume " + old + " does not match"));
  }
  EXPECT_EQ(store_.list_volumes().value().size(), 1u);
  // Another instance's volume is not this one's to replace.
  const std::string theirs =
      add_volume(VolumeState::kActive, {{"account_id", kAccount},
                                        {"region", "ap-southeast-2"},
                                        {"instance_id", "i-0ffffffffffffffff"}});
  EXPECT_EQ(code_of(replacing(theirs, secrets_.at(theirs)).first), api::kErrPolicyDenied);
  EXPECT_TRUE(contains(last_audit().detail, "bound to another instance")) << last_audit().detail;

  // This instance's own: registered, and confirming revokes the old one.
  auto [reg, req] = replacing(old, secrets_.at(old));
  ASSERT_EQ(reg.status, 200) << to_json(reg.body);
  EXPECT_TRUE(contains(last_audit().detail, "replacing volume " + old)) << last_audit().detail;
  EXPECT_EQ(store_.get_volume(old)->state, VolumeState::kActive);  // until the new one is confirmed
  ASSERT_EQ(confirm(reg, req).status, 200);
  EXPECT_EQ(store_.get_volume(old)->state, VolumeState::kRevoked);
  EXPECT_EQ(last_audit().event, "rotate");
  EXPECT_EQ(last_audit().volume_id, old);
  EXPECT_EQ(code_of(unlock(unlock_request(old))), api::kErrRevoked);
  // A revoked volume is not replaced again.
  EXPECT_EQ(code_of(replacing(old, secrets_.at(old)).first), api::kErrRevoked);

  // An image group's volume stays active for the group.
  const std::string group =
      add_volume(VolumeState::kActive, {{"account_id", kAccount},
                                        {"region", "ap-southeast-2"},
                                        {"image_id", "ami-0cbde744623b7506b"}});
  auto [greg, greq] = replacing(group, secrets_.at(group));
  ASSERT_EQ(greg.status, 200) << to_json(greg.body);
  ASSERT_EQ(confirm(greg, greq).status, 200);
  EXPECT_EQ(store_.get_volume(group)->state, VolumeState::kActive);
  EXPECT_EQ(unlock(unlock_request(group)).status, 200);
}

TEST_F(KeyServiceTest, AWrongConfirmationProofIsRefusedAndAudited) {
  const std::string vid = add_volume(VolumeState::kPending);
  Json::Value confirm;
  confirm[api::field::kVolumeId] = vid;
  confirm[api::field::kProof] = base64_encode(Bytes(kSha256Size, 7));
  ApiResponse r = service_->enroll_confirm(to_json(confirm), "peer");
  EXPECT_EQ(r.status, 403);
  EXPECT_EQ(code_of(r), api::kErrPolicyDenied);
  EXPECT_EQ(last_audit().event, "enroll.confirm");
  EXPECT_EQ(last_audit().outcome, "refused");
  EXPECT_EQ(store_.get_volume(vid)->state, VolumeState::kPending);
}

TEST_F(KeyServiceTest, AnAbandonedPendingVolumeIsRevokedOnTheRecord) {
  const std::string vid = add_volume(VolumeState::kPending);
  // The confirm's proof is not an abandon's: refused, nothing changes.
  Json::Value wrong;
  wrong[api::field::kVolumeId] = vid;
  wrong[api::field::kProof] = base64_encode(api::enrollment_confirmation(secrets_.at(vid), vid));
  ApiResponse refused = service_->enroll_abandon(to_json(wrong), "peer");
  EXPECT_EQ(refused.status, 403);
  EXPECT_EQ(code_of(refused), api::kErrPolicyDenied);
  EXPECT_EQ(store_.get_volume(vid)->state, VolumeState::kPending);
  ApiResponse done = abandon(vid);
  ASSERT_EQ(done.status, 200) << to_json(done.body);
  EXPECT_EQ(done.body[api::field::kState].asString(), "revoked");
  EXPECT_EQ(store_.get_volume(vid)->state, VolumeState::kRevoked);
  EXPECT_EQ(last_audit().event, "enroll.abandon");
  EXPECT_EQ(last_audit().outcome, "ok");
  EXPECT_NE(last_audit().detail.find("keyslot removed"), std::string::npos) << last_audit().detail;
  // Asked again (its answer lost): the same answer. A confirm after it is refused.
  EXPECT_EQ(abandon(vid).status, 200);
  Json::Value confirm;
  confirm[api::field::kVolumeId] = vid;
  confirm[api::field::kProof] = base64_encode(api::enrollment_confirmation(secrets_.at(vid), vid));
  EXPECT_EQ(code_of(service_->enroll_confirm(to_json(confirm), "peer")), api::kErrRevoked);
  // An active volume stays active.
  const std::string active = add_volume(VolumeState::kActive);
  EXPECT_EQ(abandon(active).status, 409);
  EXPECT_EQ(store_.get_volume(active)->state, VolumeState::kActive);
}

TEST_F(KeyServiceTest, PendingVolumesExpireOnTheRecordAndCannotBeConfirmedAfter) {
  ServiceOptions o = options_;
  o.pending_ttl_seconds = 3600;
  restart_service(o);
  const std::string stale = add_volume(VolumeState::kPending);  // created at kNow
  clock_.advance_ms(3601 * 1000);
  // Its confirm comes too late: refused, and the volume is revoked.
  Json::Value confirm;
  confirm[api::field::kVolumeId] = stale;
  confirm[api::field::kProof] = base64_encode(api::enrollment_confirmation(secrets_.at(stale), stale));
  ApiResponse late = service_->enroll_confirm(to_json(confirm), "peer");
  EXPECT_EQ(late.status, 403);
  EXPECT_EQ(code_of(late), api::kErrRevoked);
  EXPECT_EQ(store_.get_volume(stale)->state, VolumeState::kRevoked);
  bool expired_on_record = false;
  for (const auto& e : audit()) {
    if (e.event == "enroll.expire" && e.volume_id == stale) expired_on_record = true;
  }
  EXPECT_TRUE(expired_on_record);
  // A registration (any, even one refused) sweeps the others, at most once
  // a minute: one past its time goes, a fresh one stays.
  const std::string old_one = add_volume(VolumeState::kPending);
  clock_.advance_ms(3601 * 1000);
  const std::string fresh = add_volume(VolumeState::kPending);
  EXPECT_EQ(service_->enroll_register("{}", "peer").status, 400);
  EXPECT_EQ(store_.get_volume(old_one)->state, VolumeState::kRevoked);
  EXPECT_EQ(store_.get_volume(fresh)->state, VolumeState::kPending);
  EXPECT_EQ(expire_count(), 2u);
  // The sweep is the same called directly, and finds nothing new.
  EXPECT_EQ(service_->expire_pending_volumes().value(), 0u);
}

TEST_F(KeyServiceTest, ARateLimitBurstIsAuditedOnceAndTheBucketRefills) {
  ServiceOptions o = options_;
  o.per_source = RateLimit{1, 2};  // two at once, then one a second
  restart_service(o);
  EXPECT_EQ(service_->challenge("198.51.100.7").status, 200);
  EXPECT_EQ(service_->challenge("198.51.100.7").status, 200);
  const size_t before = audit().size();
  ApiResponse limited = service_->challenge("198.51.100.7");
  EXPECT_EQ(limited.status, 429);
  EXPECT_EQ(code_of(limited), api::kErrRateLimited);
  EXPECT_EQ(limited.retry_after_seconds, 1);
  ASSERT_EQ(audit().size(), before + 1);
  EXPECT_EQ(last_audit().event, "challenge");
  EXPECT_NE(last_audit().detail.find("rate limit per address"), std::string::npos);
  // The rest of the burst: refused, not audited.
  for (int i = 0; i < 50; ++i) EXPECT_EQ(service_->challenge("198.51.100.7").status, 429);
  EXPECT_EQ(audit().size(), before + 1);
  // Another address is not held back; the first gets in once the bucket refills.
  EXPECT_EQ(service_->challenge("198.51.100.8").status, 200);
  clock_.advance_ms(999);
  EXPECT_EQ(service_->challenge("198.51.100.7").status, 429);
  clock_.advance_ms(1);
  EXPECT_EQ(service_->challenge("198.51.100.7").status, 200);
  // A new burst is audited again.
  EXPECT_EQ(service_->challenge("198.51.100.7").status, 429);
  EXPECT_EQ(audit().size(), before + 2);
}

TEST(RateLimit, SourcesAreKeyedByAddressAndIpv6ByItsSlash64) {
  EXPECT_EQ(source_key("198.51.100.7"), "198.51.100.7");
  EXPECT_EQ(source_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
  EXPECT_EQ(source_key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::/64");
  EXPECT_EQ(source_key("::ffff:198.51.100.7"), "198.51.100.7");
}

TEST(RateLimit, KeepsAtMostItsKeyCount) {
  RateLimiter limiter(RateLimit{1, 1}, 100);
  for (int i = 0; i < 1000; ++i) EXPECT_TRUE(limiter.take(std::to_string(i), 0).allowed);
  // The newest keys are still remembered: spent.
  EXPECT_FALSE(limiter.take("999", 0).allowed);
  // Disabled: everything passes.
  RateLimiter off(RateLimit{0, 0});
  for (int i = 0; i < 100; ++i) EXPECT_TRUE(off.take("x", 0).allowed);
}

}  // namespace
}  // namespace keygate::server
