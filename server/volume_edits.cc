#include "server/volume_edits.h"

#include <algorithm>

#include "core/encoding.h"
#include "core/json.h"

namespace keygate::server {

Result<PolicyEdit> edit_volume_policy(Store& store, const Clock& clock, const std::string& id, const char* event,
                                      const std::string& peer, const std::string& by, const PolicyChange& change) {
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto record = store.get_volume(id);
    if (!record.is_ok()) return record.status();
    auto json = parse_json_object(record->policy_json);
    if (!json.is_ok()) return json.status();
    auto policy = VolumePolicy::from_json(json.value());
    if (!policy.is_ok()) return policy.status();
    PolicyEdit edit;
    KEYGATE_RETURN_IF_ERROR(change(policy.value(), clock.now_unix(), &edit));
    if (edit.detail.empty()) return edit;
    Status st = store.update_volume_policy(id, record->policy_json, to_json(policy->to_json()), clock.now_unix());
    if (st.kind() == ErrorKind::kConflict) continue;
    KEYGATE_RETURN_IF_ERROR(st);
    if (Status audited = store.append_audit(AuditEvent{clock.now_unix(), event, "ok", id, peer, by + edit.detail});
        !audited.is_ok()) {
      return audited.with_context(str_cat("volume ", id, ": ", edit.detail, ", but not on the audit trail"));
    }
    return edit;
  }
  return Status::error(ErrorKind::kConflict, "the volume's policy keeps changing; try again");
}

PolicyChange revoke_instance_change(const std::string& id, const std::string& instance) {
  return [id, instance](VolumePolicy& policy, int64_t, PolicyEdit* edit) -> Status {
    if (instance.empty() || instance.size() > 128 ||
        !std::all_of(instance.begin(), instance.end(), [](char c) { return c > 0x20 && c < 0x7f; })) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("instance '", printable(instance, 64),
                                   "': an instance id is 1 to 128 printable characters, no spaces"));
    }
    if (!policy.is_image_group()) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("volume ", id, " belongs to one instance, not an image group: revoke the volume"));
    }
    if (policy.revoked_instances.count(instance) != 0) {
      edit->unchanged = str_cat("instance ", instance, " was already revoked");
      return Status::ok();
    }
    if (policy.revoked_instances.size() >= kMaxRevokedInstances) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("volume ", id, " has ", kMaxRevokedInstances,
                                   " instances revoked already, the most one volume keeps; rotate the group "
                                   "onto a new volume"));
    }
    policy.revoked_instances.insert(instance);
    policy.known_instances.erase(instance);  // manual-first: a revoked instance is no longer known
    edit->detail = str_cat("instance ", instance, " revoked; the group's other instances still unlock");
    return Status::ok();
  };
}

}  // namespace keygate::server
