#include "core/protocol.h"

#include <algorithm>

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

std::string gcp_audience(const Bytes& binding) {
  return "keygate:v1:" + base64url_encode(binding.data(), binding.size());
}

std::string azure_nonce(const Bytes& binding) {
  return hex_encode(binding.data(), std::min<size_t>(binding.size(), 16));
}

Bytes enrollment_confirmation(const SecretBuffer& secret, std::string_view volume_id) {
  std::string data = "keygate-v1 confirm";
  data.append(volume_id);
  return hmac_sha256(secret, data);
}

Bytes enrollment_abandonment(const SecretBuffer& secret, std::string_view volume_id) {
  std::string data = "keygate-v1 abandon";
  data.append(volume_id);
  return hmac_sha256(secret, data);
}

Bytes rotation_proof(const SecretBuffer& old_secret, std::string_view old_volume_id,
                     const Bytes& nonce) {
  std::string data = "keygate-v1 rotate";
  data.append(old_volume_id);
  data.append(reinterpret_cast<const char*>(nonce.data()), nonce.size());
  return hmac_sha256(old_secret, data);
}

}  // namespace keygate::api
