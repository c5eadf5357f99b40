#include "server/rate_limit.h"

#include <arpa/inet.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace keygate::server {

RateLimiter::Decision RateLimiter::take(const std::string& key, int64_t now_ms) {
  Decision d;
  if (!limit_.enabled()) return d;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = buckets_.find(key);
  if (it == buckets_.end()) {
    if (buckets_.size() >= max_keys_) forget_full(now_ms);
    it = buckets_.emplace(key, Bucket{limit_.burst, now_ms}).first;
  }
  Bucket& b = it->second;
  const double elapsed = static_cast<double>(std::max<int64_t>(now_ms - b.at_ms, 0)) / 1000.0;
  b.tokens = std::min(limit_.burst, b.tokens + elapsed * limit_.per_second);
  b.at_ms = now_ms;
  if (b.tokens >= 1) {
    b.tokens -= 1;
    b.limited = false;
    return d;
  }
  d.allowed = false;
  d.burst_start = !b.limited;
  b.limited = true;
  d.retry_after_ms = static_cast<int64_t>(std::ceil((1 - b.tokens) / limit_.per_second * 1000));
  return d;
}

// A full bucket is the same as none: forgetting it changes nothing. When
// every bucket is in use (an attacker with many addresses), the oldest go.
void RateLimiter::forget_full(int64_t now_ms) {
  for (auto it = buckets_.begin(); it != buckets_.end();) {
    const double elapsed = static_cast<double>(now_ms - it->second.at_ms) / 1000.0;
    it = it->second.tokens + elapsed * limit_.per_second >= limit_.burst ? buckets_.erase(it)
                                                                          : std::next(it);
  }
  if (buckets_.size() < max_keys_) return;
  // The least recently used eighth goes at once, so that a stream of new
  // keys costs one such pass per max_keys / 8 of them, not one per key.
  std::vector<std::pair<int64_t, std::string>> by_age;
  by_age.reserve(buckets_.size());
  for (const auto& [key, bucket] : buckets_) by_age.emplace_back(bucket.at_ms, key);
  const size_t drop = std::max<size_t>(1, by_age.size() / 8);
  std::nth_element(by_age.begin(), by_age.begin() + static_cast<std::ptrdiff_t>(drop - 1), by_age.end());
  for (size_t i = 0; i < drop; ++i) buckets_.erase(by_age[i].second);
}

std::string source_key(const std::string& address) {
  in6_addr v6{};
  if (address.find(':') == std::string::npos || inet_pton(AF_INET6, address.c_str(), &v6) != 1) {
    return address;
  }
  // IPv4-mapped addresses are IPv4 hosts.
  static const uint8_t kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (std::equal(kMapped, kMapped + 12, v6.s6_addr)) {
    char text[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, v6.s6_addr + 12, text, sizeof(text));
    return text;
  }
  std::fill(v6.s6_addr + 8, v6.s6_addr + 16, 0);
  char text[INET6_ADDRSTRLEN];
  inet_ntop(AF_INET6, &v6, text, sizeof(text));
  return std::string(text) + "/64";
}

}  // namespace keygate::server
