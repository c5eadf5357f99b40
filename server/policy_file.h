// Named release policies in a file operators keep in git (JSON): each
// names the platform and the verified claims an instance must have (one
// value, or a list of allowed values), an optional daily time window (UTC)
// and its approval mode. A volume enrolled with a token that names a policy
// is released only while that policy, as the file says now, admits the
// instance (deny by default: a policy no longer in the file admits nothing).
//
//   {"policies": {
//      "web-prod": {"platform": "aws",
//                   "require": {"account_id": "123456789012",
//                               "region": ["eu-west-1", "eu-central-1"]},
//                   "hours_utc": "06:00-22:00",
//                   "approval": "manual", "approvers": 2,
//                   "approval_timeout": 900}}}
//
// The file is validated whole on load; an error names the file and line.
// PolicyRegistry holds the policy in effect: a file with an error is
// refused and the running policy stays.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "server/policy.h"

namespace keygate::server {

constexpr size_t kMaxPolicyFile = 1 << 20;
constexpr size_t kMaxPolicies = 1000;
constexpr size_t kMaxAllowedValues = 64;
constexpr int kMaxApprovers = 5;
constexpr int kMaxReleaseCount = 100000;
constexpr int kMinReleasePeriod = 60;
constexpr int kMaxReleasePeriod = 31 * 86400;
constexpr int kMinApprovalTimeout = 10;
constexpr int kMaxApprovalTimeout = 24 * 3600;

struct NamedPolicy {
  std::string name;
  std::string platform;
  std::map<std::string, std::vector<std::string>> require;  // claim -> allowed values
  // Minutes after midnight UTC, [start, end); start > end wraps past
  // midnight. Unset: any time.
  std::optional<std::pair<int, int>> hours_utc;
  // Days of the week (UTC, 0 Monday ... 6 Sunday) on which it admits;
  // empty: every day.
  std::set<int> days_utc;
  // At most `first` releases to one instance of a volume within `second`
  // seconds (a boot loop, or a stolen identity used over and over); unset:
  // no limit. Counted with the release's audit record, in its transaction.
  std::optional<std::pair<int, int>> max_releases;
  // "automatic"; "manual": every release waits for `approvers` different
  // people to approve it; "manual-first": an instance's first release does,
  // and once approved the instance is known to the volume and its reboots
  // are released unattended. A request not decided within
  // approval_timeout seconds is denied.
  std::string approval = "automatic";
  int approvers = 1;
  int approval_timeout = 900;
  // A TPM-bound volume's quote with PCR values it does not accept:
  // "refuse" it, or make it an "approval" request that shows which PCRs
  // changed (old and new); approving it releases the key and adds the new
  // values to the volume's accepted set, so the next boot with them is
  // unattended.
  std::string pcr_change = "refuse";
  int line = 0;  // where it is defined
};

struct PolicySet {
  std::map<std::string, NamedPolicy> policies;
  std::string source;  // the file's path
  std::string sha256;  // of the file's bytes, hex
  // The person who put it in effect through the admin API (who may then
  // not approve the requests its policies make); empty: at start or SIGHUP.
  std::string loaded_by;
  std::string text;     // the file's bytes, as parsed
  int64_t version = 0;  // its number in a store replicas share; 0: this server's alone
};

// Parses a policy file's text; `source` names it in errors ("FILE:LINE: ...").
Result<PolicySet> parse_policy_file(std::string_view text, const std::string& source);

// Reads the file at `path` (bounded) and parses it.
Result<PolicySet> read_policy_file(const std::string& path);

// OK if `identity` satisfies `policy` at `now` (unix seconds); otherwise
// kRefused naming the condition (for the server's log and audit trail).
Status evaluate_named_policy(const NamedPolicy& policy, const Identity& identity, int64_t now);

// The policy file in effect, shared by the request threads and reloaded on
// SIGHUP. Empty (no file configured) until a load succeeds.
class PolicyRegistry {
 public:
  // Reads and validates `path`; on success it becomes the policy in effect,
  // on failure the one in effect stays. Returns the new set or the error.
  Result<std::shared_ptr<const PolicySet>> load(const std::string& path, const std::string& loaded_by = "");
  // Puts `set` in effect, unless a set of a newer shared version is in
  // effect already (replicas following the store's newest version).
  void install(std::shared_ptr<const PolicySet> set);
  std::shared_ptr<const PolicySet> current() const;

 private:
  mutable std::mutex mu_;
  std::shared_ptr<const PolicySet> current_;
};

}  // namespace keygate::server
