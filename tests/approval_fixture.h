// The approvals tests' fixture: a real keygate-server with a policy file
// that asks for approvals, people's certificates from its admin CA (alice
// the admin, bob and carol approvers, vic a viewer), and helpers to enroll,
// wait and decide. Shared by approval_test.cc and operators_test.cc.
#pragma once

#include <chrono>
#include <future>
#include <regex>
#include <thread>

#include "tests/keygate_fixture.h"

namespace keygate::testing {

class ApprovalTest : public KeygateTest {
 protected:
  void SetUp() override {
    KeygateTest::SetUp();
    const Identity id;
    policy_file_ = dir_ + "/" + unique("approval-policy") + ".json";
    write_file(policy_file_, str_cat(R"({"policies": {
  "manual": {"platform": "aws", "require": {"account_id": ")", id.account, R"("}, "approval": "manual"},
  "two": {"platform": "aws", "require": {"account_id": ")", id.account, R"("}, "approval": "manual", "approvers": 2},
  "first": {"platform": "aws", "require": {"account_id": ")", id.account, R"("}, "approval": "manual-first"},
  "quick": {"platform": "aws", "require": {"account_id": ")", id.account, R"("}, "approval": "manual",
            "approval_timeout": 10}
}}
)"));
    server_.process.stop();
    server_ = start_server("approvals", {"--policy-file", policy_file_});
    ASSERT_GT(server_.port, 0) << read_file(server_.process.log_path());
    people_ = dir_ + "/" + unique("people");
    ASSERT_EQ(mkdir(people_.c_str(), 0700), 0);
    RunResult boot = run({bin("keygate-server"), "admin", "bootstrap", "--state-dir", server_.state, "--name", "alice",
                          "--out", folder("alice"), "--server-url", server_.url()});
    ASSERT_EQ(boot.exit_code, 0) << boot.err;
    const std::vector<std::pair<std::string, std::string>> people = {
        {"bob", "approver"}, {"carol", "approver"}, {"vic", "viewer"}, {id.instance, "approver"}};
    for (const auto& [name, role] : people) {
      RunResult issued = admin("alice", {"cert", "issue", "--name", name, "--role", role, "--out", folder(name)});
      ASSERT_EQ(issued.exit_code, 0) << issued.err;
    }
  }

  std::string folder(const std::string& who) { return people_ + "/" + who; }

  RunResult admin(const std::string& who, std::vector<std::string> args) {
    std::vector<std::string> argv = {bin("keygate-server"), "admin"};
    for (auto& a : args) argv.push_back(a);
    argv.push_back("--admin-dir");
    argv.push_back(folder(who));
    return run(argv);
  }

  // A volume enrolled with a token alice issued through the admin API for
  // the policy `policy` (empty: `token_options` only); returns (path, volume id).
  std::pair<std::string, std::string> enrolled_under(const std::string& policy,
                                                     std::vector<std::string> token_options = {}) {
    std::vector<std::string> args = {"token", "create"};
    if (!policy.empty()) token_options.insert(token_options.begin(), {"--policy", policy});
    for (auto& o : token_options) args.push_back(o);
    RunResult token = admin("alice", args);
    EXPECT_EQ(token.exit_code, 0) << token.err;
    const std::string token_file = dir_ + "/" + unique("token");
    write_file(token_file, token.out);
    const std::string vol = new_volume_file();
    RunResult r = enroll_format(vol, server_, token_file, emulator_);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::smatch m;
    EXPECT_TRUE(std::regex_search(r.out, m, std::regex("enrolled as volume ([0-9a-f-]+)"))) << r.out;
    return {vol, m.size() > 1 ? m[1].str() : ""};
  }

  // `keygate unlock` as the initramfs runs it, on a thread: it waits.
  std::future<RunResult> unlock_waiting(const std::string& volume, int deadline_s = 60) {
    return std::async(std::launch::async, [this, volume, deadline_s] {
      return run({bin("keygate"), "unlock", volume, "--verify-only", "--metadata-url", emulator_.url(),
                  "--timeout", "5", "--deadline", std::to_string(deadline_s)});
    });
  }

  // The pending request of `volume_id` once the server has made it (as a
  // viewer sees it), or null after 30 s (wall clock, however slow each
  // listing is: a sanitized build's are).
  Json::Value pending_request(const std::string& volume_id, const std::string& other_than = "") {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < give_up) {
      RunResult listed = admin("vic", {"requests", "--json"});
      EXPECT_EQ(listed.exit_code, 0) << listed.err;
      auto parsed = parse_json_object(listed.out, 1 << 20);
      if (parsed.is_ok()) {
        for (const auto& r : parsed.value()["requests"]) {
          if (r["volume_id"].asString() == volume_id && r["request_id"].asString() != other_than) return r;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    ADD_FAILURE() << "no pending request for volume " << volume_id << "; server log:\n"
                  << read_file(server_.process.log_path());
    return Json::Value();
  }

  std::string audit() {
    return run({bin("keygate-server"), "audit", "--state-dir", server_.state, "--limit", "1000"}).out;
  }

  std::string policy_file_;
  std::string people_;
};

}  // namespace keygate::testing
