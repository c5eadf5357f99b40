#include "core/protocol.h"

#include "core/crypto.h"

namespace keygate::api {

bool is_valid_volume_id(std::string_view id) {
  if (id.empty() || id.size() > kMaxVolumeIdLength) return false;
  for (char c : id) {
    bool ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              c == '-' || c == '_';
    if (!ok) return false;
  }
  return true;
}

Bytes enrollment_confirmation(const SecretBuffer& secret, std::string_view volume_id) {
  std::string data = "keygate-v1 confirm";
  data.append(volume_id);
  return hmac_sha256(secret, data);
}

}  // namespace keygate::api
