// Token buckets: per source address (every request) and per verified
// instance (unlocks and registrations), so that neither one noisy host nor
// one instance in a retry loop can take the key server's capacity. A request
// over its bucket is answered 429 with Retry-After (the unlocker retries);
// it is audited once per burst, not once per request.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>

namespace keygate::server {

struct RateLimit {
  double per_second = 0;  // refill rate; 0: no limit
  double burst = 0;       // bucket size: requests allowed at once
  bool enabled() const { return per_second > 0 && burst >= 1; }
};

class RateLimiter {
 public:
  explicit RateLimiter(RateLimit limit, size_t max_keys = 65536)
      : limit_(limit), max_keys_(max_keys) {}

  struct Decision {
    bool allowed = true;
    bool burst_start = false;  // the first refusal since the key last got through
    int64_t retry_after_ms = 0;
  };
  Decision take(const std::string& key, int64_t now_ms);
  const RateLimit& limit() const { return limit_; }

 private:
  struct Bucket {
    double tokens;
    int64_t at_ms;
    bool limited = false;
  };
  void forget_full(int64_t now_ms);

  const RateLimit limit_;
  const size_t max_keys_;
  std::mutex mu_;
  std::unordered_map<std::string, Bucket> buckets_;
};

// The bucket key of a peer address: an IPv4 address as it is; an IPv6
// address by its /64, the share of addresses one host or site gets.
std::string source_key(const std::string& address);

}  // namespace keygate::server
