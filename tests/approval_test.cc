// Approvals and the admin API, end to end: a real keygate-server with a
// policy file, people's certificates from its admin CA (mTLS), the real
// keygate unlocker waiting on a real LUKS2 header, and the real
// `keygate-server admin` commands deciding.
#include <atomic>
#include <future>
#include <thread>

#include "tests/approval_fixture.h"

namespace keygate::testing {
namespace {

TEST_F(ApprovalTest, AnUnlockWaitsForAnApproverAndOnlyAnotherPersonMayApprove) {
  const Identity id;
  auto [vol, vid] = enrolled_under("manual");
  ASSERT_FALSE(vid.empty());
  auto waiting = unlock_waiting(vol);
  const Json::Value request = pending_request(vid);
  const std::string rid = request["request_id"].asString();
  ASSERT_FALSE(rid.empty());
  // What the approver sees: the verified claims, who issued the token.
  EXPECT_EQ(request["instance"].asString(), id.instance);
  EXPECT_EQ(request["claims"]["account_id"].asString(), id.account);
  EXPECT_EQ(request["claims"]["image_id"].asString(), id.image);
  EXPECT_EQ(request["issued_by"].asString(), "alice");
  EXPECT_EQ(request["approvals_needed"].asInt(), 1);

  // A viewer, the token's issuer and the instance itself may not approve.
  RunResult r = admin("vic", {"approve", rid, "--reason", "looks fine"});
  EXPECT_EQ(r.exit_code, kExitRefused);
  EXPECT_TRUE(contains(r.err, "vic is viewer; this needs the approver role")) << r.err;
  r = admin("alice", {"approve", rid, "--reason", "my own token"});
  EXPECT_EQ(r.exit_code, kExitRefused);
  EXPECT_TRUE(contains(r.err, "alice issued the enrollment token of volume " + vid)) << r.err;
  r = admin(id.instance, {"approve", rid, "--reason", "me"});
  EXPECT_EQ(r.exit_code, kExitRefused);
  EXPECT_TRUE(contains(r.err, "is the instance that asked")) << r.err;
  // A decision needs a reason.
  r = admin("bob", {"approve", rid, "--reason", ""});
  EXPECT_EQ(r.exit_code, kExitUsage) << r.err;
  // Still waiting after all of that.
  EXPECT_EQ(waiting.wait_for(std::chrono::milliseconds(0)), std::future_status::timeout);

  r = admin("bob", {"approve", rid, "--reason", "change CHG-1234, planned reboot"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, rid + ": approved (1 of 1 approvals)")) << r.out;
  RunResult unlocked = waiting.get();
  EXPECT_EQ(unlocked.exit_code, 0) << unlocked.err;
  // The console line names the same request the approver saw.
  EXPECT_TRUE(contains(unlocked.err, str_cat("waiting for approval: request ", rid, " (volume ", vid, ", instance ",
                                             id.instance, ")")))
      << unlocked.err;

  const std::string trail = audit();
  EXPECT_TRUE(contains(trail, "approval.request pending volume=" + vid)) << trail;
  EXPECT_TRUE(contains(trail, "approval.approve refused volume=" + vid + " peer=127.0.0.1 by alice (admin): alice issued"))
      << trail;
  EXPECT_TRUE(contains(trail, "approval.approve approved volume=" + vid)) << trail;
  EXPECT_TRUE(contains(trail, "change CHG-1234, planned reboot")) << trail;
  EXPECT_TRUE(contains(trail, "unlock released volume=" + vid)) << trail;
  EXPECT_TRUE(contains(trail, "approved by bob (" + rid + ")")) << trail;
  // The approval was spent: deciding it again is a conflict, and the next
  // boot asks anew.
  r = admin("carol", {"approve", rid, "--reason", "again"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.err, "is used, not pending")) << r.err;
  auto again = unlock_waiting(vol);
  const std::string next = pending_request(vid, rid)["request_id"].asString();
  EXPECT_NE(next, rid);
  EXPECT_EQ(admin("carol", {"approve", next, "--reason", "second boot"}).exit_code, 0);
  EXPECT_EQ(again.get().exit_code, 0);
  EXPECT_EQ(run({bin("keygate-server"), "audit", "verify", "--state-dir", server_.state}).exit_code, 0);
}

TEST_F(ApprovalTest, ATwoApproverPolicyNeedsTwoDifferentPeople) {
  auto [vol, vid] = enrolled_under("two");
  ASSERT_FALSE(vid.empty());
  auto waiting = unlock_waiting(vol);
  const std::string rid = pending_request(vid)["request_id"].asString();
  RunResult r = admin("bob", {"approve", rid, "--reason", "first"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, rid + ": pending (1 of 2 approvals)")) << r.out;
  r = admin("bob", {"approve", rid, "--reason", "me again"});
  EXPECT_EQ(r.exit_code, kExitRefused);
  EXPECT_TRUE(contains(r.err, "bob has approved this request already")) << r.err;
  std::this_thread::sleep_for(std::chrono::seconds(2));
  EXPECT_EQ(waiting.wait_for(std::chrono::milliseconds(0)), std::future_status::timeout);
  r = admin("carol", {"approve", rid, "--reason", "second"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, rid + ": approved (2 of 2 approvals)")) << r.out;
  RunResult unlocked = waiting.get();
  EXPECT_EQ(unlocked.exit_code, 0) << unlocked.err;
  EXPECT_TRUE(contains(audit(), "approved by bob, carol (" + rid + ")")) << audit();
}

TEST_F(ApprovalTest, ADenialEndsTheWaitWithTheRefusedExitAtOnce) {
  auto [vol, vid] = enrolled_under("manual");
  ASSERT_FALSE(vid.empty());
  auto waiting = unlock_waiting(vol, 120);
  const std::string rid = pending_request(vid)["request_id"].asString();
  const auto denied_at = std::chrono::steady_clock::now();
  RunResult r = admin("bob", {"deny", rid, "--reason", "no change ticket"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, rid + ": denied")) << r.out;
  RunResult unlocked = waiting.get();
  // Refused, at its next poll (at most 5 s), not at its 120 s deadline.
  EXPECT_EQ(unlocked.exit_code, kExitRefused) << unlocked.err;
  EXPECT_LT(std::chrono::steady_clock::now() - denied_at, std::chrono::seconds(30));
  EXPECT_TRUE(contains(unlocked.err, "approval_denied")) << unlocked.err;
  EXPECT_TRUE(contains(audit(), "denied by bob: no change ticket")) << audit();
  // A denied request is not approved afterwards.
  r = admin("carol", {"approve", rid, "--reason", "overrule"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.err, "is denied, not pending")) << r.err;
}

TEST_F(ApprovalTest, ARequestNotDecidedInTimeIsDenied) {
  auto [vol, vid] = enrolled_under("quick");  // approval_timeout 10
  ASSERT_FALSE(vid.empty());
  auto waiting = unlock_waiting(vol, 60);
  const std::string rid = pending_request(vid)["request_id"].asString();
  RunResult unlocked = waiting.get();
  EXPECT_EQ(unlocked.exit_code, kExitRefused) << unlocked.err;
  EXPECT_TRUE(contains(unlocked.err, "expired")) << unlocked.err;
  EXPECT_TRUE(contains(audit(), "approval.expire denied volume=" + vid)) << audit();
  RunResult r = admin("bob", {"approve", rid, "--reason", "too late"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.err, "is expired, not pending")) << r.err;
}

TEST_F(ApprovalTest, ManualFirstLetsAKnownInstanceRebootUnattended) {
  auto [vol, vid] = enrolled_under("first");
  ASSERT_FALSE(vid.empty());
  auto waiting = unlock_waiting(vol);
  const std::string rid = pending_request(vid)["request_id"].asString();
  EXPECT_EQ(admin("bob", {"approve", rid, "--reason", "new web node"}).exit_code, 0);
  EXPECT_EQ(waiting.get().exit_code, 0);
  // Its reboots: no request, no wait.
  for (int boot = 0; boot < 2; ++boot) {
    RunResult r = unlock(vol, emulator_);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_FALSE(contains(r.err, "waiting for approval")) << r.err;
  }
  RunResult listed = admin("vic", {"requests", "--all", "--json"});
  auto parsed = parse_json_object(listed.out, 1 << 20);
  ASSERT_TRUE(parsed.is_ok()) << listed.out;
  EXPECT_EQ(parsed.value()["requests"].size(), 1u) << listed.out;
  RunResult instances = admin("vic", {"instances"});
  EXPECT_TRUE(contains(instances.out, Identity().instance + "  aws  known  volume " + vid)) << instances.out;
}

TEST_F(ApprovalTest, TheAdminApiWantsARecordedCertificateInForce) {
  // No certificate: 401, and the unlock API on the same port is unaffected.
  auto cli = api_client(server_);
  auto res = cli->Get("/v1/admin/requests");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401);
  EXPECT_TRUE(contains(res->body, "unauthenticated"));
  // A revoked certificate is refused; one cannot revoke itself.
  RunResult serial = admin("vic", {"whoami", "--json"});
  auto who = parse_json_object(serial.out);
  ASSERT_TRUE(who.is_ok()) << serial.out;
  EXPECT_EQ(who.value()["role"].asString(), "viewer");
  RunResult revoked = admin("alice", {"cert", "revoke", who.value()["serial"].asString()});
  EXPECT_EQ(revoked.exit_code, 0) << revoked.err;
  auto alice = parse_json_object(admin("alice", {"whoami", "--json"}).out);
  ASSERT_TRUE(alice.is_ok());
  RunResult self = admin("alice", {"cert", "revoke", alice.value()["serial"].asString()});
  EXPECT_EQ(self.exit_code, kExitRefused);
  EXPECT_TRUE(contains(self.err, "cannot revoke itself")) << self.err;
  RunResult after = admin("vic", {"requests"});
  EXPECT_EQ(after.exit_code, kExitRefused);
  EXPECT_TRUE(contains(after.err, "is revoked")) << after.err;
  // Only an admin issues certificates; bootstrap only the first.
  RunResult issued = admin("bob", {"cert", "issue", "--name", "mallory", "--role", "admin", "--out", folder("mallory")});
  EXPECT_EQ(issued.exit_code, kExitRefused) << issued.err;
  RunResult again = run({bin("keygate-server"), "admin", "bootstrap", "--state-dir", server_.state, "--name", "eve",
                         "--out", folder("eve")});
  EXPECT_EQ(again.exit_code, kExitUsage);
  EXPECT_TRUE(contains(again.err, "an admin certificate is in force already")) << again.err;
  // A certificate of another server's admin CA does not get through the handshake.
  Server other = start_server("other-admin-ca");
  ASSERT_GT(other.port, 0);
  RunResult foreign = run({bin("keygate-server"), "admin", "bootstrap", "--state-dir", other.state, "--name", "eve",
                           "--out", folder("eve")});
  ASSERT_EQ(foreign.exit_code, 0) << foreign.err;
  RunResult crossed = run({bin("keygate-server"), "admin", "whoami", "--admin-dir", folder("eve"), "--server",
                           server_.url()});
  EXPECT_NE(crossed.exit_code, 0);
  other.process.stop();
  const std::string trail = audit();
  EXPECT_TRUE(contains(trail, "admin.cert.revoke ok")) << trail;
  EXPECT_TRUE(contains(trail, "admin.cert.issue refused")) << trail;
  EXPECT_EQ(run({bin("keygate-server"), "audit", "verify", "--state-dir", server_.state}).exit_code, 0);
}

TEST_F(ApprovalTest, AnAdminRevokesOneInstanceOfAGroupThroughTheApi) {
  const Identity id;
  auto [vol, vid] = enrolled_under("", {"--image-group"});
  ASSERT_FALSE(vid.empty());
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  RunResult r = admin("bob", {"revoke", vid, "--instance", id.instance});
  EXPECT_EQ(r.exit_code, kExitRefused);  // an approver is not an admin
  r = admin("alice", {"revoke", vid, "--instance", "i-1\x1b[2J"});
  EXPECT_EQ(r.exit_code, kExitUsage);
  EXPECT_TRUE(contains(r.err, "printable characters")) << r.err;
  EXPECT_FALSE(contains(r.err, "\x1b")) << r.err;  // escaped, never raw on the terminal
  r = admin("alice", {"revoke", vid, "--instance", id.instance});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, "instance " + id.instance + " revoked; the group's other instances still unlock")) << r.out;
  EXPECT_EQ(unlock(vol, emulator_).exit_code, kExitRefused);
  r = admin("alice", {"revoke", vid, "--instance", id.instance});
  EXPECT_TRUE(contains(r.out, "was already revoked")) << r.out;
  RunResult shown = admin("vic", {"volume", vid});
  EXPECT_EQ(shown.exit_code, 0) << shown.err;
  EXPECT_TRUE(contains(shown.out, "\"revoked_instances\"")) << shown.out;
  RunResult instances = admin("vic", {"instances"});
  EXPECT_EQ(instances.exit_code, 0) << instances.err;
  EXPECT_TRUE(contains(instances.out, id.instance + "  aws  revoked  volume " + vid + " (active)")) << instances.out;
  EXPECT_TRUE(contains(audit(), "revoke.instance ok volume=" + vid + " peer=127.0.0.1 by alice (admin): instance " +
                                    id.instance))
      << audit();
}

// An administrator rotates a volume's secret: the admin API hands out a
// one-use token bound to the volume's instance, the instance's `keygate
// rotate` moves the device to a new secret, and confirming it revokes the
// old volume, so a copy of the device taken before no longer opens. Unlocks
// running meanwhile all open the device.
TEST_F(ApprovalTest, AnAdminRotatesAVolumeAndACopyTakenBeforeNoLongerOpens) {
  auto [vol, vid] = enrolled_under("");
  ASSERT_FALSE(vid.empty());
  const std::string copy = dir_ + "/" + unique("snapshot") + ".img";
  ASSERT_EQ(run({"cp", "--sparse=always", vol, copy}).exit_code, 0);
  ASSERT_EQ(unlock(copy, emulator_).exit_code, 0);

  RunResult r = admin("bob", {"rotate", vid});
  EXPECT_EQ(r.exit_code, kExitRefused);  // an approver is not an admin
  EXPECT_TRUE(contains(r.err, "bob is approver; this needs the admin role")) << r.err;
  r = admin("alice", {"rotate", vid, "--ttl", "0"});
  EXPECT_EQ(r.exit_code, kExitUsage) << r.err;
  r = admin("alice", {"rotate", "no-such-volume"});
  EXPECT_NE(r.exit_code, 0);
  RunResult issued = admin("alice", {"rotate", vid});
  ASSERT_EQ(issued.exit_code, 0) << issued.err;
  EXPECT_TRUE(contains(issued.err, "keygate rotate DEVICE --enrollment-token-file")) << issued.err;
  const std::string token_file = dir_ + "/" + unique("rotation-token");
  write_file(token_file, issued.out);

  // Unlocks while the rotation runs (paced within the instance's rate limit).
  std::atomic<bool> stop{false};
  std::vector<RunResult> during;
  std::thread unlocker([&] {
    for (int i = 0; i < 12 && !stop; ++i) {
      during.push_back(unlock(vol, emulator_));
      std::this_thread::sleep_for(std::chrono::milliseconds(150));
    }
  });
  RunResult rotated = run({bin("keygate"), "rotate", vol, "--enrollment-token-file", token_file,
                           "--metadata-url", emulator_.url(), "--timeout", "10"});
  stop = true;
  unlocker.join();
  ASSERT_EQ(rotated.exit_code, 0) << rotated.err;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(
      rotated.out, m, std::regex("rotated from volume ([0-9a-f-]+) to volume ([0-9a-f-]+)")))
      << rotated.out;
  EXPECT_EQ(m[1].str(), vid);
  const std::string new_id = m[2].str();
  EXPECT_FALSE(during.empty());
  for (const RunResult& u : during) EXPECT_EQ(u.exit_code, 0) << u.err;

  // The old volume is revoked: the device opens with its new secret, the
  // copy taken before (the old token and keyslot only) does not.
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  RunResult old_copy = unlock(copy, emulator_);
  EXPECT_EQ(old_copy.exit_code, kExitRefused) << old_copy.err;
  EXPECT_TRUE(contains(admin("vic", {"volume", vid}).out, "\"state\" : \"revoked\""))
      << admin("vic", {"volume", vid}).out;
  EXPECT_TRUE(contains(admin("vic", {"volume", new_id}).out, "\"state\" : \"active\""));
  RunResult status = run({bin("keygate"), "status", vol, "--json"});
  EXPECT_TRUE(contains(status.out, new_id) && !contains(status.out, vid)) << status.out;

  // The token was for one use, and only an active volume is rotated.
  const std::string header = read_file(vol).substr(0, 1 << 20);
  RunResult again = run({bin("keygate"), "rotate", vol, "--enrollment-token-file", token_file,
                         "--metadata-url", emulator_.url(), "--timeout", "10"});
  EXPECT_NE(again.exit_code, 0);
  EXPECT_EQ(read_file(vol).substr(0, 1 << 20), header);
  r = admin("alice", {"rotate", vid});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(contains(r.err, "is revoked; only an active volume is rotated")) << r.err;

  const std::string trail = audit();
  EXPECT_TRUE(
      contains(trail, "rotate.request ok volume=" + vid + " peer=127.0.0.1 by alice (admin)"))
      << trail;
  EXPECT_TRUE(contains(trail, "rotate ok volume=" + vid)) << trail;
  EXPECT_TRUE(contains(trail, "replaced by volume " + new_id)) << trail;
  EXPECT_EQ(run({bin("keygate-server"), "audit", "verify", "--state-dir", server_.state}).exit_code,
            0);
}

// A group's secret opens every instance's copy: it is not rotated (each
// instance moves to a key of its own instead), and a token made by hand
// cannot claim to be a rotation.
TEST_F(ApprovalTest, AnImageGroupsVolumeIsNotRotatedAndNoTokenClaimsToRotate) {
  auto [vol, vid] = enrolled_under("", {"--image-group"});
  ASSERT_FALSE(vid.empty());
  RunResult r = admin("alice", {"rotate", vid});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(contains(r.err, "is an image group's; each instance moves to a key of its own"))
      << r.err;
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  const std::string people_ca = folder("alice");
  RunResult forged = run({"curl", "-s", "--cacert", people_ca + "/server-ca.pem", "--cert",
                          people_ca + "/cert.pem", "--key", people_ca + "/key.pem", "-H",
                          "Content-Type: application/json", "--data",
                          R"({"platform": "aws", "require": {}, "rotates": ")" + vid + R"("})",
                          server_.url() + "/v1/admin/tokens"});
  EXPECT_TRUE(contains(forged.out, "a rotation token comes from volumes/ID/rotate"))
      << forged.out << forged.err;
}

// The admin API's input, from a client with a valid approver certificate:
// each bad request gets a clear 4xx, nothing changes, and the server serves on.
TEST_F(ApprovalTest, TheAdminApiRefusesGarbageWithClearErrors) {
  auto [vol, vid] = enrolled_under("manual");
  ASSERT_FALSE(vid.empty());
  auto waiting = unlock_waiting(vol, 30);
  const std::string rid = pending_request(vid)["request_id"].asString();
  httplib::SSLClient bob("127.0.0.1", server_.port, folder("bob") + "/cert.pem", folder("bob") + "/key.pem");
  bob.set_ca_cert_path(server_.ca().c_str());
  bob.enable_server_certificate_verification(true);
  bob.set_connection_timeout(5);
  bob.set_read_timeout(10);
  struct Case {
    const char* method;
    std::string path;
    std::string body;
    int status;
    const char* says;
  };
  const std::string approve = "/v1/admin/requests/" + rid + "/approve";
  const std::vector<Case> cases = {
      {"POST", approve, "{not json", 400, "bad_request"},
      {"POST", approve, std::string(api::kMaxRequestBody + 1, ' '), 400, "request_too_large"},
      {"POST", approve, R"({"reason": "ok\u001b[2J"})", 400, "control character"},
      {"POST", approve, R"({"reason": 5})", 400, "reason"},
      {"POST", approve, std::string(R"({"reason": ")") + std::string(300, 'x') + "\"}", 400, "reason"},
      {"POST", approve, "{}", 400, "needs a reason"},
      {"POST", "/v1/admin/requests/req-%1b%5b2J/approve", R"({"reason": "x"})", 400, "not a request id"},
      {"POST", "/v1/admin/requests/" + rid + "/../../certs", "{}", 404, "no such admin endpoint"},
      {"GET", "/v1/admin/requests?all=1;drop", "", 400, "the only query is all=1"},
      {"GET", approve, "", 404, "no such admin endpoint"},
      {"PUT", approve, "{}", 405, "method not allowed"},
      {"POST", "/v1/admin/certs", R"({"name": "x\u0007y", "role": "admin", "public_key": "k"})", 403, "needs the admin role"},
  };
  for (const Case& c : cases) {
    httplib::Result res = c.method == std::string("GET")    ? bob.Get(c.path)
                          : c.method == std::string("PUT") ? bob.Put(c.path, c.body, "application/json")
                                                           : bob.Post(c.path, c.body, "application/json");
    ASSERT_TRUE(res) << c.path;
    EXPECT_EQ(res->status, c.status) << c.path << ": " << res->body;
    EXPECT_TRUE(contains(res->body, c.says)) << c.path << ": " << res->body;
  }
  // An admin's bad certificate requests: refused, nothing issued.
  httplib::SSLClient alice("127.0.0.1", server_.port, folder("alice") + "/cert.pem", folder("alice") + "/key.pem");
  alice.set_ca_cert_path(server_.ca().c_str());
  alice.enable_server_certificate_verification(true);
  for (const std::string& body : {std::string(R"({"name": "x\u0007y", "role": "admin", "public_key": "k"})"),
                                  std::string(R"({"name": "mallory", "role": "root", "public_key": "k"})"),
                                  std::string(R"({"name": "mallory", "role": "admin", "public_key": "not a key"})"),
                                  std::string(R"({"name": "mallory", "role": "admin", "public_key": "k", "days": 100000})")}) {
    auto res = alice.Post("/v1/admin/certs", body, "application/json");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 400) << body << ": " << res->body;
  }
  RunResult certs = admin("vic", {"certs"});
  EXPECT_FALSE(contains(certs.out, "mallory")) << certs.out;
  // An admin's bad rotation requests: refused, no token made.
  const std::string rotate = "/v1/admin/volumes/" + vid + "/rotate";
  const std::vector<std::pair<std::string, std::string>> rotations = {
      {rotate, R"({"ttl": 0})"},
      {rotate, R"({"ttl": "3600"})"},
      {rotate, R"({"ttl": 99999999999})"},
      {rotate, R"({"uses": 5})"},
      {rotate, "[1, 2]"},
      {"/v1/admin/volumes/%1b%5b2J/rotate", "{}"}};
  for (const auto& [path, body] : rotations) {
    auto res = alice.Post(path, body, "application/json");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 400) << path << " " << body << ": " << res->body;
  }
  EXPECT_FALSE(contains(audit(), "rotate.request")) << audit();
  // Still pending, still decidable, and the waiting unlock completes.
  RunResult r = admin("bob", {"approve", rid, "--reason", "after the garbage"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(waiting.get().exit_code, 0);
  // No control character reached the log.
  const std::string log = read_file(server_.process.log_path());
  EXPECT_FALSE(contains(log, "\x1b[2J")) << log;
  EXPECT_FALSE(contains(log, "\x07")) << log;
}

}  // namespace
}  // namespace keygate::testing
