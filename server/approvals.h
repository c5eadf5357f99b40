// Releases that wait for people: an unlock under a policy whose approval is
// "manual" (or "manual-first", for an instance the volume does not know yet)
// becomes an approval request. The instance is answered 202 with the
// request's id and the claims the approvers see, and asks again (each time
// attested anew) until the request is decided or expires. Approvers approve
// or deny through the admin API (server/admin_api.h) with a reason; an
// approved request releases the key once, to the instance that asked.
#pragma once

#include <json/value.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/encoding.h"
#include "core/status.h"
#include "server/store.h"

namespace keygate::server {

// The roles of admin certificates, each allowed what the one before it is.
enum class AdminRole { kViewer, kApprover, kAdmin };
const char* admin_role_name(AdminRole role);
std::optional<AdminRole> parse_admin_role(std::string_view name);

// A person, as their verified admin certificate names them.
struct AdminIdentity {
  std::string name;
  AdminRole role = AdminRole::kViewer;
  std::string serial;  // hex
};

// Whether `name` may stand in an admin certificate: 1 to
// kMaxAdminNameLength of [A-Za-z0-9._@-] (an e-mail address fits).
bool is_admin_name(std::string_view name);

constexpr size_t kMaxDecisionReason = 256;

struct ApprovalDecision {
  std::string name;
  std::string reason;
  int64_t time = 0;
};

// A TPM-bound volume's PCR whose quoted value it does not accept.
struct PcrChange {
  std::vector<Bytes> accepted;  // what the volume accepts now
  Bytes quoted;                 // what this boot's quote says
  bool operator==(const PcrChange& o) const { return accepted == o.accepted && quoted == o.quoted; }
};

struct Approval {
  std::string id;  // "req-" and 12 characters of [a-z2-7]
  std::string volume_id;
  std::string instance;  // the platform's instance claim
  std::string state = "pending";
  std::string policy;  // the policy file's policy that asked for it
  std::string mode;    // "manual" or "manual-first"
  std::string platform;
  std::map<std::string, std::string> claims;  // what the provider vouched for
  std::string issued_by;  // who issued the volume's token (may not approve)
  std::string policy_by;  // who put the policy file in effect (may not approve)
  int needed = 1;         // approvals from different people
  // A PCR change (policy pcr_change "approval"): approving it adds the
  // quoted values to the volume's accepted set. Empty: none.
  std::string pcr_bank;
  std::map<uint32_t, PcrChange> pcr_changes;
  std::vector<ApprovalDecision> approvals;
  std::optional<ApprovalDecision> denial;
  int64_t created_at = 0;
  int64_t expires_at = 0;

  // "expired" for a pending request past its time (not yet recorded so).
  std::string state_at(int64_t now) const;
  // What the admin API shows of it, and what an instance is told (no
  // approver's name or reason).
  Json::Value to_json(int64_t now) const;
  Json::Value to_instance_json(int64_t now) const;

  ApprovalRecord to_record() const;
  static Result<Approval> from_record(const ApprovalRecord& record);
};

std::string new_approval_id();
bool is_approval_id(std::string_view id);

// Whether `who` may approve `request`: the approver role, not the instance
// that asked, not whoever issued the volume's token or put the policy file
// in effect, not twice. The message
// says why not (for the approver and the trail).
Status may_approve(const Approval& request, const AdminIdentity& who);

}  // namespace keygate::server
