// The Prometheus text format as server/metrics.h writes it.
#include "server/metrics.h"

#include <openssl/hmac.h>

#include <gtest/gtest.h>

#include "core/encoding.h"
#include "server/operations.h"
#include "server/webhook.h"

namespace keygate::server {
namespace {

TEST(MetricsTest, CountersGaugesAndHistogramsRenderInTheTextFormat) {
  Metrics m;
  m.counter_add("keygate_releases_total", "Keys released.", {{"platform", "aws"}});
  m.counter_add("keygate_releases_total", "Keys released.", {{"platform", "aws"}});
  m.counter_add("keygate_releases_total", "Keys released.", {{"platform", "gcp"}});
  m.gauge_set("keygate_outstanding_nonces", "Challenges issued and not yet answered.", {}, 7);
  for (double v : {0.004, 0.02, 0.3, 2.0}) {
    m.observe("keygate_unlock_seconds", "Unlock latency.", {0.01, 0.1, 1}, {{"platform", "aws"}},
              v);
  }
  EXPECT_EQ(m.render(),
            "# HELP keygate_outstanding_nonces Challenges issued and not yet answered.\n"
            "# TYPE keygate_outstanding_nonces gauge\n"
            "keygate_outstanding_nonces 7\n"
            "# HELP keygate_releases_total Keys released.\n"
            "# TYPE keygate_releases_total counter\n"
            "keygate_releases_total{platform=\"aws\"} 2\n"
            "keygate_releases_total{platform=\"gcp\"} 1\n"
            "# HELP keygate_unlock_seconds Unlock latency.\n"
            "# TYPE keygate_unlock_seconds histogram\n"
            "keygate_unlock_seconds_bucket{platform=\"aws\",le=\"0.01\"} 1\n"
            "keygate_unlock_seconds_bucket{platform=\"aws\",le=\"0.1\"} 2\n"
            "keygate_unlock_seconds_bucket{platform=\"aws\",le=\"1\"} 3\n"
            "keygate_unlock_seconds_bucket{platform=\"aws\",le=\"+Inf\"} 4\n"
            "keygate_unlock_seconds_sum{platform=\"aws\"} 2.324\n"
            "keygate_unlock_seconds_count{platform=\"aws\"} 4\n");
}

// A label value holding what a client sent cannot end its line or its quote.
TEST(MetricsTest, LabelValuesAreEscaped) {
  Metrics m;
  m.counter_add("keygate_refusals_total", "Refusals.", {{"reason", "a\"b\\c\nd"}});
  EXPECT_EQ(m.render(),
            "# HELP keygate_refusals_total Refusals.\n"
            "# TYPE keygate_refusals_total counter\n"
            "keygate_refusals_total{reason=\"a\\\"b\\\\c\\nd\"} 1\n");
}

// What a client sent never becomes a label value: a platform outside the
// known three is "other", an error code that is not an identifier is "other".
TEST(OperationsTest, LabelsComeFromFixedSets) {
  FixedClock clock(1700000000);
  Operations ops(clock);
  ops.released("aws");
  ops.refused("evil\n\"platform", "evidence_invalid");
  ops.refused("gcp", "x\ny");
  ops.evidence_failed("azure\u001b");
  ops.evidence_failed("tpm_quote");
  const std::string text = ops.render(3, 2);
  EXPECT_NE(text.find("keygate_releases_total{platform=\"aws\"} 1\n"), std::string::npos) << text;
  EXPECT_NE(text.find("keygate_releases_total{platform=\"gcp\"} 0\n"), std::string::npos) << text;
  EXPECT_NE(text.find("keygate_refusals_total{platform=\"other\",reason=\"evidence_invalid\"} 1\n"),
            std::string::npos) << text;
  EXPECT_NE(text.find("keygate_refusals_total{platform=\"gcp\",reason=\"other\"} 1\n"), std::string::npos) << text;
  EXPECT_NE(text.find("keygate_evidence_failures_total{kind=\"other\"} 1\n"), std::string::npos) << text;
  EXPECT_NE(text.find("keygate_evidence_failures_total{kind=\"tpm_quote\"} 1\n"), std::string::npos) << text;
  EXPECT_NE(text.find("keygate_outstanding_nonces 3\n"), std::string::npos) << text;
  EXPECT_NE(text.find("keygate_open_connections 2\n"), std::string::npos) << text;
  EXPECT_EQ(text.find("evil"), std::string::npos) << text;
}

// The signature a receiver checks: HMAC-SHA256 over "<timestamp>.<body>",
// as OpenSSL computes it.
TEST(WebhookTest, TheSignatureIsAnHmacOfTimestampAndBody) {
  const std::string key = "0123456789abcdef0123456789abcdef";
  auto made = SecretBuffer::copy_of(key.data(), key.size());
  ASSERT_TRUE(made.is_ok());
  const SecretBuffer& secret = made.value();
  const std::string body = R"({"type":"approval.requested"})";
  unsigned char mac[32];
  unsigned int size = 0;
  const std::string text = "1700000000." + body;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(text.data()),
       text.size(), mac, &size);
  EXPECT_EQ(webhook_signature(secret, 1700000000, body), "t=1700000000,sha256=" + hex_encode(mac, size));
  EXPECT_NE(webhook_signature(secret, 1700000001, body), webhook_signature(secret, 1700000000, body));
}

}  // namespace
}  // namespace keygate::server
