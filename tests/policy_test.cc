#include "server/policy.h"

#include "core/json.h"

#include <gtest/gtest.h>

namespace keygate::server {
namespace {

Identity aws_instance() {
  return Identity{"aws",
                  {{"account_id", "111122223333"},
                   {"region", "eu-west-1"},
                   {"image_id", "ami-1"},
                   {"instance_id", "i-1"},
                   {"instance_type", "t3.micro"}}};
}

Identity gcp_instance() {
  return Identity{"gcp",
                  {{"project_id", "proj-a"},
                   {"project_number", "42"},
                   {"zone", "europe-west1-b"},
                   {"instance_id", "1234567890"},
                   {"instance_name", "web-1"}}};
}

Identity azure_instance() {
  return Identity{"azure",
                  {{"subscription_id", "sub-a"}, {"vm_id", "vm-1"}, {"sku", "22_04-lts-gen2"}}};
}

EnrollmentTemplate tmpl(const std::string& platform, std::map<std::string, std::string> require,
                        bool group = false) {
  EnrollmentTemplate t;
  t.platform = platform;
  t.require = std::move(require);
  t.image_group = group;
  return t;
}

TEST(Policy, PerInstanceVolumeBindsEnrollingInstance) {
  Identity id = aws_instance();
  auto p = policy_for_enrollment(tmpl("aws", {}), &id);
  ASSERT_TRUE(p.is_ok()) << p.status().message();
  EXPECT_EQ(p->require.at("account_id"), "111122223333");
  EXPECT_EQ(p->require.at("region"), "eu-west-1");
  EXPECT_EQ(p->require.at("image_id"), "ami-1");
  EXPECT_EQ(p->require.at("instance_id"), "i-1");
  EXPECT_EQ(p->require.count("instance_type"), 0u);  // not inherited
  EXPECT_TRUE(evaluate_policy(p.value(), id).is_ok());

  for (const char* claim : {"instance_id", "account_id", "region", "image_id"}) {
    Identity other = id;
    other.claims[claim] = "something-else";
    Status s = evaluate_policy(p.value(), other);
    EXPECT_EQ(s.kind(), ErrorKind::kRefused) << claim;
    EXPECT_NE(s.message().find(claim), std::string::npos) << s.message();
    other.claims.erase(claim);
    EXPECT_EQ(evaluate_policy(p.value(), other).kind(), ErrorKind::kRefused) << claim;
  }
}

TEST(Policy, ImageGroupVolumeAcceptsAnyInstanceOfTheImage) {
  auto t = tmpl("aws", {{"image_id", "ami-golden"}, {"account_id", "111122223333"},
                        {"region", "eu-west-1"}}, true);
  auto p = policy_for_enrollment(t, nullptr);  // offline, by an image builder
  ASSERT_TRUE(p.is_ok()) << p.status().message();
  EXPECT_EQ(p->require.count("instance_id"), 0u);
  Identity id = aws_instance();
  id.claims["image_id"] = "ami-golden";
  id.claims["instance_id"] = "i-anything";
  EXPECT_TRUE(evaluate_policy(p.value(), id).is_ok());
  id.claims["image_id"] = "ami-other";
  EXPECT_EQ(evaluate_policy(p.value(), id).kind(), ErrorKind::kRefused);

  // A builder on another image may enroll a group volume for the golden one.
  Identity builder = aws_instance();
  auto q = policy_for_enrollment(t, &builder);
  ASSERT_TRUE(q.is_ok()) << q.status().message();
  EXPECT_EQ(q->require.at("image_id"), "ami-golden");
}

// One instance of an image group revoked: it is refused, the group's
// others are not; the list survives the policy's JSON, and a list that is
// not one is refused on load.
TEST(Policy, ARevokedInstanceOfAnImageGroupIsRefusedAndItsGroupIsNot) {
  auto p = policy_for_enrollment(tmpl("aws", {{"image_id", "ami-golden"}, {"account_id", "111122223333"},
                                              {"region", "eu-west-1"}}, true),
                                 nullptr);
  ASSERT_TRUE(p.is_ok());
  EXPECT_TRUE(p->is_image_group());
  p->revoked_instances.insert("i-bad");
  Identity bad = aws_instance();
  bad.claims["image_id"] = "ami-golden";
  bad.claims["instance_id"] = "i-bad";
  Identity good = bad;
  good.claims["instance_id"] = "i-good";
  auto back = VolumePolicy::from_json(p->to_json());
  ASSERT_TRUE(back.is_ok()) << back.status().message();
  EXPECT_TRUE(back->revokes(bad));
  EXPECT_FALSE(back->revokes(good));
  Identity none = bad;
  none.claims.erase("instance_id");
  EXPECT_FALSE(back->revokes(none));
  // No list, no key: older policies read as before.
  EXPECT_FALSE(VolumePolicy::from_json(p->to_json()).value().revoked_instances.empty());
  p->revoked_instances.clear();
  EXPECT_FALSE(p->to_json().isMember("revoked_instances"));

  Identity id = aws_instance();
  auto single = policy_for_enrollment(tmpl("aws", {}), &id);
  ASSERT_TRUE(single.is_ok());
  EXPECT_FALSE(single->is_image_group());

  Json::Value v = back->to_json();
  for (const Json::Value& list : {Json::Value("i-bad"), Json::Value(Json::objectValue), [] {
         Json::Value a(Json::arrayValue);
         a.append(5);
         return a;
       }(), [] {
         Json::Value a(Json::arrayValue);
         a.append("");
         return a;
       }(), [] {
         Json::Value a(Json::arrayValue);
         a.append(std::string(129, 'i'));
         return a;
       }(), [] {
         Json::Value a(Json::arrayValue);
         for (size_t i = 0; i <= kMaxRevokedInstances; ++i) a.append("i-" + std::to_string(i));
         return a;
       }()}) {
    v["revoked_instances"] = list;
    EXPECT_EQ(VolumePolicy::from_json(v).status().kind(), ErrorKind::kInvalidArgument) << to_json(list).substr(0, 80);
  }
}

TEST(Policy, IncompletePoliciesAreRefused) {
  // No evidence and no account/region: nothing to bind.
  EXPECT_FALSE(policy_for_enrollment(tmpl("aws", {{"image_id", "ami-1"}}, true), nullptr).is_ok());
  // Per-instance without evidence.
  EXPECT_FALSE(
      policy_for_enrollment(tmpl("aws", {{"account_id", "1"}, {"region", "r"}}), nullptr).is_ok());
  // AWS group without an image.
  EXPECT_FALSE(
      policy_for_enrollment(tmpl("aws", {{"account_id", "1"}, {"region", "r"}}, true), nullptr)
          .is_ok());
  // GCP group without a project.
  EXPECT_FALSE(policy_for_enrollment(tmpl("gcp", {{"zone", "z"}}, true), nullptr).is_ok());
  VolumePolicy empty;
  EXPECT_FALSE(evaluate_policy(empty, aws_instance()).is_ok());
  VolumePolicy no_account{"aws", {{"region", "eu-west-1"}, {"instance_id", "i-1"}}};
  EXPECT_FALSE(evaluate_policy(no_account, aws_instance()).is_ok());
}

TEST(Policy, TokenForAnotherAccountIsRefused) {
  Identity id = aws_instance();
  auto p = policy_for_enrollment(tmpl("aws", {{"account_id", "444455556666"}}), &id);
  ASSERT_FALSE(p.is_ok());
  EXPECT_EQ(p.status().kind(), ErrorKind::kRefused);
}

TEST(Policy, GcpAndAzureShareTheModel) {
  Identity g = gcp_instance();
  auto p = policy_for_enrollment(tmpl("gcp", {{"zone", "europe-west1-b"}}), &g);
  ASSERT_TRUE(p.is_ok()) << p.status().message();
  EXPECT_EQ(p->require.at("project_id"), "proj-a");
  EXPECT_EQ(p->require.at("instance_id"), "1234567890");
  EXPECT_TRUE(evaluate_policy(p.value(), g).is_ok());
  Identity other_project = g;
  other_project.claims["project_id"] = "proj-b";
  EXPECT_EQ(evaluate_policy(p.value(), other_project).kind(), ErrorKind::kRefused);

  Identity a = azure_instance();
  auto q = policy_for_enrollment(tmpl("azure", {{"sku", "22_04-lts-gen2"}}, true), &a);
  ASSERT_TRUE(q.is_ok()) << q.status().message();
  EXPECT_EQ(q->require.at("subscription_id"), "sub-a");
  EXPECT_EQ(q->require.count("vm_id"), 0u);
  Identity another_vm = a;
  another_vm.claims["vm_id"] = "vm-2";
  EXPECT_TRUE(evaluate_policy(q.value(), another_vm).is_ok());
  another_vm.claims["sku"] = "other-sku";
  EXPECT_EQ(evaluate_policy(q.value(), another_vm).kind(), ErrorKind::kRefused);

  // Evidence from another cloud than the token's, and a policy for one cloud
  // evaluated on another's identity, are refused.
  EXPECT_EQ(policy_for_enrollment(tmpl("aws", {}), &g).status().kind(), ErrorKind::kRefused);
  Identity disguised = a;
  disguised.platform = "gcp";
  EXPECT_EQ(evaluate_policy(q.value(), disguised).kind(), ErrorKind::kRefused);
}

TEST(Policy, TemplatesNameOnlyKnownClaims) {
  EXPECT_TRUE(tmpl("gcp", {{"project_id", "p"}}).validate().is_ok());
  Status s = tmpl("gcp", {{"image_id", "x"}}).validate();
  EXPECT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("image_id"), std::string::npos);
  EXPECT_FALSE(tmpl("openstack", {}).validate().is_ok());
  EXPECT_FALSE(tmpl("aws", {{"account_id", ""}}).validate().is_ok());
  EXPECT_FALSE(tmpl("azure", {{"vm_id", "v"}}, true).validate().is_ok());
}

TEST(Policy, JsonRoundTripAndValidation) {
  Identity id = aws_instance();
  VolumePolicy p = policy_for_enrollment(tmpl("aws", {}), &id).value();
  auto back = VolumePolicy::from_json(p.to_json());
  ASSERT_TRUE(back.is_ok());
  EXPECT_EQ(back->require, p.require);
  EXPECT_EQ(back->platform, "aws");
  Json::Value bad = p.to_json();
  bad["platform"] = "mainframe";
  EXPECT_FALSE(VolumePolicy::from_json(bad).is_ok());
  bad = p.to_json();
  bad["require"]["account_id"] = 7;
  EXPECT_FALSE(VolumePolicy::from_json(bad).is_ok());
  auto t = EnrollmentTemplate::from_json(tmpl("azure", {{"sku", "s"}}, true).to_json());
  ASSERT_TRUE(t.is_ok()) << t.status().message();
  EXPECT_TRUE(t->image_group);
  EXPECT_EQ(t->require.at("sku"), "s");
}

// A rotation replaces only a volume of its own instance: the same platform
// and instance claim on both sides, never a group's (no instance claim).
TEST(Policy, OnlyAVolumeOfTheSameInstanceBindsTheSameInstance) {
  VolumePolicy mine;
  mine.platform = "aws";
  mine.require = {{"account_id", "1"}, {"region", "r"}, {"instance_id", "i-1"}};
  VolumePolicy same = mine;
  same.require.erase("region");
  EXPECT_TRUE(mine.binds_same_instance_as(same));
  VolumePolicy other = mine;
  other.require["instance_id"] = "i-2";
  EXPECT_FALSE(mine.binds_same_instance_as(other));
  VolumePolicy group = mine;
  group.require.erase("instance_id");
  group.require["image_id"] = "ami-1";
  EXPECT_FALSE(mine.binds_same_instance_as(group));
  EXPECT_FALSE(group.binds_same_instance_as(mine));
  VolumePolicy gcp = mine;
  gcp.platform = "gcp";
  EXPECT_FALSE(mine.binds_same_instance_as(gcp));
}

}  // namespace
}  // namespace keygate::server
