// The policy file (server/policy_file.h): each condition admits the
// matching instance and refuses another; every error names its line.
#include "server/policy_file.h"

#include <gtest/gtest.h>

namespace keygate::server {
namespace {

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

Identity aws(const std::string& account, const std::string& region, const std::string& instance = "i-1") {
  return Identity{"aws", {{"account_id", account}, {"region", region}, {"image_id", "ami-1"}, {"instance_id", instance}}};
}

constexpr char kFile[] = R"({
  "policies": {
    "web": {
      "platform": "aws",
      "require": {"account_id": "111122223333", "region": ["eu-west-1", "eu-central-1"]}
    },
    "office-hours": {
      "platform": "aws",
      "require": {"account_id": "111122223333"},
      "hours_utc": "08:00-18:00",
      "approval": "automatic"
    },
    "night": {
      "platform": "aws",
      "require": {"account_id": "111122223333"},
      "hours_utc": "22:00-06:00"
    },
    "gcp-batch": {"platform": "gcp", "require": {"project_id": "batch-prod"}},
    "gcp-runner": {"platform": "gcp", "require": {"project_id": "batch-prod",
                   "service_account": "runner@batch-prod.iam.gserviceaccount.com"}}
  }
})";

constexpr int64_t kMonday0900 = 1764579600;  // 2025-12-01T09:00:00Z

TEST(PolicyFile, ParsesAndRecordsWhereEachPolicyIs) {
  auto set = parse_policy_file(kFile, "policy.json");
  ASSERT_TRUE(set.is_ok()) << set.status().message();
  EXPECT_EQ(set->policies.size(), 5u);
  EXPECT_EQ(set->policies.at("web").line, 3);
  EXPECT_EQ(set->policies.at("office-hours").line, 7);
  EXPECT_EQ(set->sha256.size(), 64u);
  EXPECT_EQ(set->source, "policy.json");
  auto again = parse_policy_file(std::string(kFile) + " ", "policy.json");
  ASSERT_TRUE(again.is_ok());
  EXPECT_NE(again->sha256, set->sha256);  // the hash is of the bytes
}

TEST(PolicyFile, EachConditionAdmitsTheMatchingInstanceAndRefusesAnother) {
  auto set = parse_policy_file(kFile, "policy.json").value();
  const NamedPolicy& web = set.policies.at("web");
  EXPECT_TRUE(evaluate_named_policy(web, aws("111122223333", "eu-west-1"), kMonday0900).is_ok());
  EXPECT_TRUE(evaluate_named_policy(web, aws("111122223333", "eu-central-1"), kMonday0900).is_ok());
  Status s = evaluate_named_policy(web, aws("111122223333", "us-east-1"), kMonday0900);
  EXPECT_EQ(s.kind(), ErrorKind::kRefused);
  EXPECT_TRUE(contains(s.message(), "region us-east-1 is not allowed")) << s.message();
  s = evaluate_named_policy(web, aws("999999999999", "eu-west-1"), kMonday0900);
  EXPECT_TRUE(contains(s.message(), "account_id 999999999999 is not allowed")) << s.message();
  Identity missing = aws("111122223333", "eu-west-1");
  missing.claims.erase("region");
  EXPECT_EQ(evaluate_named_policy(web, missing, kMonday0900).kind(), ErrorKind::kRefused);
  Identity gcp{"gcp", {{"project_id", "batch-prod"}}};
  s = evaluate_named_policy(web, gcp, kMonday0900);
  EXPECT_TRUE(contains(s.message(), "platform gcp, not aws")) << s.message();
  EXPECT_TRUE(evaluate_named_policy(set.policies.at("gcp-batch"), gcp, kMonday0900).is_ok());
  // A service account, where the platform reports one: required, it must be
  // there and be that one.
  const NamedPolicy& runner = set.policies.at("gcp-runner");
  EXPECT_EQ(evaluate_named_policy(runner, gcp, kMonday0900).kind(), ErrorKind::kRefused);
  Identity as_runner = gcp;
  as_runner.claims["service_account"] = "runner@batch-prod.iam.gserviceaccount.com";
  EXPECT_TRUE(evaluate_named_policy(runner, as_runner, kMonday0900).is_ok());
  as_runner.claims["service_account"] = "123-compute@developer.gserviceaccount.com";
  s = evaluate_named_policy(runner, as_runner, kMonday0900);
  EXPECT_TRUE(contains(s.message(),
                       "service_account 123-compute@developer.gserviceaccount.com is not allowed"))
      << s.message();

  const NamedPolicy& office = set.policies.at("office-hours");
  const Identity ok = aws("111122223333", "us-east-1");
  EXPECT_TRUE(evaluate_named_policy(office, ok, kMonday0900).is_ok());
  EXPECT_TRUE(evaluate_named_policy(office, ok, kMonday0900 - 3600).is_ok());  // 08:00 is in
  s = evaluate_named_policy(office, ok, kMonday0900 + 9 * 3600);  // 18:00 is out
  EXPECT_TRUE(contains(s.message(), "outside its hours (08:00-18:00 UTC; now 18:00)")) << s.message();
  const NamedPolicy& night = set.policies.at("night");
  EXPECT_FALSE(evaluate_named_policy(night, ok, kMonday0900).is_ok());
  EXPECT_TRUE(evaluate_named_policy(night, ok, kMonday0900 + 14 * 3600).is_ok());  // 23:00
  EXPECT_TRUE(evaluate_named_policy(night, ok, kMonday0900 - 4 * 3600).is_ok());   // 05:00
  EXPECT_FALSE(evaluate_named_policy(night, ok, kMonday0900 - 3 * 3600).is_ok());  // 06:00
}

TEST(PolicyFile, DaysOfTheWeekAdmitOnlyOnThoseDaysInUtc) {
  auto set = parse_policy_file(R"({"policies": {"weekdays": {"platform": "aws",
    "require": {"account_id": "111122223333"}, "days_utc": ["mon", "tue", "wed", "thu", "fri"],
    "hours_utc": "06:00-20:00"}}})",
                               "p.json");
  ASSERT_TRUE(set.is_ok()) << set.status().message();
  const NamedPolicy& p = set->policies.at("weekdays");
  const Identity ok = aws("111122223333", "us-east-1");
  for (int day = 0; day < 5; ++day) {
    EXPECT_TRUE(evaluate_named_policy(p, ok, kMonday0900 + day * 86400).is_ok()) << day;
  }
  Status s = evaluate_named_policy(p, ok, kMonday0900 + 5 * 86400);
  EXPECT_EQ(s.kind(), ErrorKind::kRefused);
  EXPECT_TRUE(contains(s.message(), "not on its days (mon,tue,wed,thu,fri UTC; today sat)")) << s.message();
  EXPECT_TRUE(contains(evaluate_named_policy(p, ok, kMonday0900 - 86400).message(), "today sun"));
  // Both conditions hold: a weekday outside the hours is refused too.
  EXPECT_FALSE(evaluate_named_policy(p, ok, kMonday0900 + 12 * 3600).is_ok());
  for (const char* bad : {R"(["mon", "mon"])", R"(["funday"])", R"([])", R"("mon")"}) {
    auto r = parse_policy_file(str_cat("{\"policies\": {\"a\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"1\"},\n\"days_utc\": ",
                                       bad, "}}}"),
                               "p.json");
    ASSERT_FALSE(r.is_ok()) << bad;
    EXPECT_TRUE(contains(r.status().message(), "p.json:2:")) << r.status().message();
    EXPECT_TRUE(contains(r.status().message(), "'days_utc' lists days of the week")) << r.status().message();
  }
}

// Each error: the file and the line of what is wrong.
TEST(PolicyFile, EveryErrorNamesItsLine) {
  struct Case {
    const char* text;
    const char* where;
    const char* what;
  } cases[] = {
      {"{\n  \"policies\": {\n    \"a\": {\"platform\": \"aws\"\n    \"b\": 1}}}", "p.json:4:", "Missing ','"},
      {"{\n \"policies\": {}, \"policies\": {}}", "p.json:2:", "Duplicate key"},
      {"{\n \"polices\": {}}", "p.json:2:", "unknown key 'polices'"},
      {"{\n\n \"policies\": []}", "p.json:3:", "'policies' (an object"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"1\"},\n  \"colour\": 1}}}",
       "p.json:3:", "unknown key 'colour'"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\",\n \"require\": {\"account\": \"1\"}}}}", "p.json:3:",
       "aws has no claim 'account'"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\",\n \"require\": {\"region\": \"x\"}}}}", "p.json:3:",
       "must require 'account_id'"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\", \"require\": {\n\"account_id\": []}}}}", "p.json:3:",
       "lists 1 to 64 values"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\", \"require\": {\"account_id\": [\n5]}}}}", "p.json:3:",
       "takes a string"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"ibm\", \"require\": {}}}}", "p.json:2:", "unknown platform 'ibm'"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"1\"},\n \"hours_utc\": \"8-18\"}}}",
       "p.json:3:", "'hours_utc' is \"HH:MM-HH:MM\""},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"1\"},\n \"hours_utc\": \"25:00-06:00\"}}}",
       "p.json:3:", "'hours_utc'"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"1\"},\n \"approvers\": 2}}}",
       "p.json:3:", "'approvers' needs approval 'manual' or 'manual-first', or pcr_change 'approval'"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"1\"},\n \"max_releases\": {\"count\": 0, \"period\": 3600}}}}",
       "p.json:3:", "'max_releases' is {\"count\": 1 to 100000, \"period\": 60 to 2678400 seconds}"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"1\"},\n \"max_releases\": 3}}}",
       "p.json:3:", "'max_releases' is"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"1\"},\n \"max_releases\": {\"count\": 3, \"period\": 3600, \"x\": 1}}}}",
       "p.json:3:", "'max_releases' is"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"1\"},\n \"pcr_change\": \"accept\"}}}",
       "p.json:3:", "'pcr_change' is \"refuse\" or \"approval\""},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"1\"}, \"approval\": \"manual\",\n \"approvers\": 6}}}",
       "p.json:3:", "'approvers' is 1 to 5"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"1\"}, \"approval\": \"manual\",\n \"approval_timeout\": 5}}}",
       "p.json:3:", "'approval_timeout' is 10 to 86400 seconds"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"1\"},\n \"approval\": \"yes\"}}}",
       "p.json:3:", "unknown approval 'yes'"},
      {"{\"policies\": {\n \"bad name\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"1\"}}}}", "p.json:2:",
       "policy name 'bad name'"},
      {"{\"policies\": {\n \"a\": {\"platform\": \"aws\", \"require\": {\"account_id\": \"\\u001b[2J\"}}}}", "", ""},
      {"{\"policies\": {}} trailing", "p.json:1:", "Extra non-whitespace"},
      {"", "p.json:1:", ""},
      {"\xff{}", "p.json:1:", "not UTF-8"},
  };
  for (const Case& c : cases) {
    auto r = parse_policy_file(c.text, "p.json");
    if (std::string(c.where).empty()) {
      EXPECT_TRUE(r.is_ok()) << c.text;  // an odd value is a value: it matches nothing else
      continue;
    }
    ASSERT_FALSE(r.is_ok()) << c.text;
    EXPECT_EQ(r.status().kind(), ErrorKind::kInvalidArgument);
    EXPECT_TRUE(contains(r.status().message(), c.where)) << c.text << "\n -> " << r.status().message();
    EXPECT_TRUE(contains(r.status().message(), c.what)) << c.text << "\n -> " << r.status().message();
    for (unsigned char ch : r.status().message()) EXPECT_TRUE(ch >= 0x20 && ch < 0x7f) << r.status().message();
  }
  EXPECT_FALSE(parse_policy_file(std::string(kMaxPolicyFile + 1, ' '), "p.json").is_ok());
}

// The README's example file is one the server takes.
TEST(PolicyFile, TheShippedExampleIsValid) {
  FILE* f = fopen(KEYGATE_SOURCE_DIR "/examples/policy.json", "r");
  ASSERT_NE(f, nullptr);
  std::string text(1 << 16, '\0');
  text.resize(fread(text.data(), 1, text.size(), f));
  fclose(f);
  auto set = parse_policy_file(text, "examples/policy.json");
  ASSERT_TRUE(set.is_ok()) << set.status().message();
  EXPECT_EQ(set->policies.size(), 4u);
}

// Replicas follow the store's newest version: an older shared version never
// replaces a newer one in effect; a server's own file (version 0) always does.
TEST(PolicyFile, ARegistryKeepsTheNewestSharedVersion) {
  PolicyRegistry registry;
  auto version = [](int64_t v) {
    auto set = parse_policy_file(kFile, "test");
    EXPECT_TRUE(set.is_ok());
    set->version = v;
    return std::make_shared<const PolicySet>(std::move(set).value());
  };
  registry.install(version(2));
  registry.install(version(1));
  EXPECT_EQ(registry.current()->version, 2);
  registry.install(version(3));
  EXPECT_EQ(registry.current()->version, 3);
  registry.install(version(0));
  EXPECT_EQ(registry.current()->version, 0);
}

TEST(PolicyFile, ARegistryKeepsThePolicyInEffectWhenALoadFails) {
  char tmpl[] = "/tmp/keygate-policy-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  const std::string path = dir + "/policy.json";
  PolicyRegistry registry;
  EXPECT_EQ(registry.current(), nullptr);
  EXPECT_FALSE(registry.load(path).is_ok());  // no file yet
  FILE* f = fopen(path.c_str(), "w");
  fputs(kFile, f);
  fclose(f);
  ASSERT_TRUE(registry.load(path).is_ok());
  auto first = registry.current();
  ASSERT_NE(first, nullptr);
  f = fopen(path.c_str(), "w");
  fputs("{\"policies\": {", f);
  fclose(f);
  auto refused = registry.load(path);
  EXPECT_FALSE(refused.is_ok());
  EXPECT_TRUE(contains(refused.status().message(), path + ":1:")) << refused.status().message();
  EXPECT_EQ(registry.current(), first);
  unlink(path.c_str());
  rmdir(dir.c_str());
}

}  // namespace
}  // namespace keygate::server
