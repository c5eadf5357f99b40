// The Prometheus text format as server/metrics.h writes it.
#include "server/metrics.h"

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace keygate::server
