// Changes an administrator makes to a volume's policy, the same whether
// they come from the command line on the server's host or through the
// admin API: read, change, store back by compare-and-swap (so a concurrent
// unlock's accept-next is not overwritten), and audit.
#pragma once

#include <functional>
#include <string>

#include "core/clock.h"
#include "core/status.h"
#include "server/policy.h"
#include "server/store.h"

namespace keygate::server {

// What a change says it did, for the trail and the person ("" and
// `unchanged` set: nothing to do).
struct PolicyEdit {
  std::string detail;
  std::string unchanged;  // why nothing was done, when nothing was
};
using PolicyChange = std::function<Status(VolumePolicy& policy, int64_t now, PolicyEdit* edit)>;

// Applies `change` to volume `id`'s policy and audits it as `event` from
// `peer`, the detail prefixed by `by` ("" or "by NAME: "). Tried again when
// an unlock changed the policy meanwhile; kConflict if it keeps changing.
Result<PolicyEdit> edit_volume_policy(Store& store, const Clock& clock, const std::string& id, const char* event,
                                      const std::string& peer, const std::string& by, const PolicyChange& change);

// Refuses one instance of an image group's volume from now on (its
// instance claim's value; Azure: vm_id); the group's others go on.
PolicyChange revoke_instance_change(const std::string& id, const std::string& instance);

}  // namespace keygate::server
