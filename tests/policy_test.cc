#include "server/policy.h"

#include <gtest/gtest.h>

namespace keygate::server {
namespace {

AwsIdentity instance() {
  AwsIdentity id;
  id.account_id = "111122223333";
  id.region = "eu-west-1";
  id.image_id = "ami-1";
  id.instance_id = "i-1";
  return id;
}

TEST(Policy, PerInstanceVolumeBindsEnrollingInstance) {
  AwsIdentity id = instance();
  auto p = policy_for_enrollment(EnrollmentTemplate{}, &id);
  ASSERT_TRUE(p.is_ok()) << p.status().message();
  EXPECT_EQ(p->account, "111122223333");
  EXPECT_EQ(p->region, "eu-west-1");
  EXPECT_EQ(p->instance_id, "i-1");
  EXPECT_TRUE(evaluate_policy(p.value(), id).is_ok());

  AwsIdentity other = id;
  other.instance_id = "i-2";
  Status s = evaluate_policy(p.value(), other);
  EXPECT_EQ(s.kind(), ErrorKind::kRefused);
  EXPECT_NE(s.message().find("instance"), std::string::npos);
  other = id;
  other.account_id = "999999999999";
  EXPECT_EQ(evaluate_policy(p.value(), other).kind(), ErrorKind::kRefused);
  other = id;
  other.region = "us-east-1";
  EXPECT_EQ(evaluate_policy(p.value(), other).kind(), ErrorKind::kRefused);
}

TEST(Policy, ImageGroupVolumeAcceptsAnyInstanceOfTheImage) {
  EnrollmentTemplate t;
  t.image_group = true;
  t.image_id = "ami-golden";
  t.account = "111122223333";
  t.region = "eu-west-1";
  auto p = policy_for_enrollment(t, nullptr);  // offline, by an image builder
  ASSERT_TRUE(p.is_ok()) << p.status().message();
  EXPECT_TRUE(p->instance_id.empty());
  AwsIdentity id = instance();
  id.image_id = "ami-golden";
  id.instance_id = "i-anything";
  EXPECT_TRUE(evaluate_policy(p.value(), id).is_ok());
  id.image_id = "ami-other";
  EXPECT_EQ(evaluate_policy(p.value(), id).kind(), ErrorKind::kRefused);
}

TEST(Policy, IncompletePoliciesAreRefused) {
  // No evidence and no account/region: nothing to bind.
  EnrollmentTemplate t;
  t.image_group = true;
  t.image_id = "ami-1";
  EXPECT_FALSE(policy_for_enrollment(t, nullptr).is_ok());
  // Per-instance without evidence.
  EnrollmentTemplate u;
  u.account = "1";
  u.region = "r";
  EXPECT_FALSE(policy_for_enrollment(u, nullptr).is_ok());
  // Group without an image.
  EnrollmentTemplate g;
  g.image_group = true;
  g.account = "1";
  g.region = "r";
  EXPECT_FALSE(policy_for_enrollment(g, nullptr).is_ok());
  VolumePolicy empty;
  EXPECT_FALSE(evaluate_policy(empty, instance()).is_ok());
}

TEST(Policy, TokenForAnotherAccountIsRefused) {
  EnrollmentTemplate t;
  t.account = "444455556666";
  AwsIdentity id = instance();
  auto p = policy_for_enrollment(t, &id);
  ASSERT_FALSE(p.is_ok());
  EXPECT_EQ(p.status().kind(), ErrorKind::kRefused);
}

TEST(Policy, JsonRoundTripAndValidation) {
  AwsIdentity id = instance();
  VolumePolicy p = policy_for_enrollment(EnrollmentTemplate{}, &id).value();
  auto back = VolumePolicy::from_json(p.to_json());
  ASSERT_TRUE(back.is_ok());
  EXPECT_EQ(back->instance_id, "i-1");
  Json::Value bad = p.to_json();
  bad["platform"] = "mainframe";
  EXPECT_FALSE(VolumePolicy::from_json(bad).is_ok());
  bad = p.to_json();
  bad.removeMember("account");
  EXPECT_FALSE(VolumePolicy::from_json(bad).is_ok());
}

}  // namespace
}  // namespace keygate::server
