#include "core/envelope.h"

#include "core/json.h"

namespace keygate {
namespace {

constexpr char kDomain[] = "keygate-v1";
constexpr size_t kMaxSecretSize = 1024;

std::string envelope_aad(std::string_view volume_id, const Bytes& nonce) {
  std::string aad = kDomain;
  uint32_t n = static_cast<uint32_t>(volume_id.size());
  aad.push_back(static_cast<char>(n >> 24));
  aad.push_back(static_cast<char>(n >> 16));
  aad.push_back(static_cast<char>(n >> 8));
  aad.push_back(static_cast<char>(n));
  aad.append(volume_id);
  aad.append(as_string_view(nonce));
  return aad;
}

Result<SecretBuffer> derive_wrap_key(const SecretBuffer& shared, const Bytes& nonce,
                                     const Bytes& client_pub, const Bytes& server_pub) {
  std::string info = "keygate-v1 wrap";
  info.append(as_string_view(client_pub));
  info.append(as_string_view(server_pub));
  return hkdf_sha256(shared, nonce, info, kAesKeySize);
}

}  // namespace

Json::Value WrappedSecret::to_json() const {
  Json::Value v(Json::objectValue);
  v["alg"] = kEnvelopeAlgorithm;
  v["epk"] = base64_encode(server_public);
  v["sealed"] = base64_encode(sealed);
  return v;
}

Result<WrappedSecret> WrappedSecret::from_json(const Json::Value& value) {
  auto alg = json_string(value, "alg", 64);
  if (!alg.is_ok()) return alg.status().with_context("envelope");
  if (alg.value() != kEnvelopeAlgorithm) {
    return Status::error(ErrorKind::kInvalidArgument, "envelope: unsupported algorithm");
  }
  auto epk = json_string(value, "epk", 64);
  auto sealed = json_string(value, "sealed", 4096);
  if (!epk.is_ok()) return epk.status().with_context("envelope");
  if (!sealed.is_ok()) return sealed.status().with_context("envelope");
  auto epk_bytes = base64_decode(epk.value());
  auto sealed_bytes = base64_decode(sealed.value());
  if (!epk_bytes.is_ok() || epk_bytes->size() != kX25519KeySize) {
    return Status::error(ErrorKind::kInvalidArgument, "envelope: bad ephemeral public key");
  }
  if (!sealed_bytes.is_ok() || sealed_bytes->size() < kGcmIvSize + kGcmTagSize) {
    return Status::error(ErrorKind::kInvalidArgument, "envelope: bad sealed data");
  }
  return WrappedSecret{std::move(epk_bytes).value(), std::move(sealed_bytes).value()};
}

Bytes binding_value(const Bytes& nonce, const Bytes& client_public_key,
                    std::string_view volume_id) {
  std::string input = kDomain;
  input.append(as_string_view(nonce));
  input.append(as_string_view(client_public_key));
  input.append(volume_id);
  return sha256(input);
}

Result<WrappedSecret> wrap_secret_for_client(const SecretBuffer& secret,
                                             const Bytes& client_public_key,
                                             std::string_view volume_id, const Bytes& nonce) {
  if (secret.empty() || secret.size() > kMaxSecretSize) {
    return Status::error(ErrorKind::kInternal, "wrap: secret size out of range");
  }
  auto server = X25519KeyPair::generate();
  if (!server.is_ok()) return server.status();
  auto shared = server->shared_secret(client_public_key);
  if (!shared.is_ok()) return shared.status().with_context("wrap");
  Bytes server_pub(server->public_key.begin(), server->public_key.end());
  auto key = derive_wrap_key(shared.value(), nonce, client_public_key, server_pub);
  if (!key.is_ok()) return key.status();
  auto sealed = aes_gcm_seal(key.value(), secret.data(), secret.size(),
                             envelope_aad(volume_id, nonce));
  if (!sealed.is_ok()) return sealed.status();
  return WrappedSecret{std::move(server_pub), std::move(sealed).value()};
}

Result<SecretBuffer> unwrap_secret(const WrappedSecret& wrapped, const X25519KeyPair& client,
                                   std::string_view volume_id, const Bytes& nonce) {
  auto shared = client.shared_secret(wrapped.server_public);
  if (!shared.is_ok()) return shared.status().with_context("unwrap");
  Bytes client_pub(client.public_key.begin(), client.public_key.end());
  auto key = derive_wrap_key(shared.value(), nonce, client_pub, wrapped.server_public);
  if (!key.is_ok()) return key.status();
  auto secret = aes_gcm_open(key.value(), wrapped.sealed, envelope_aad(volume_id, nonce));
  if (!secret.is_ok()) {
    return Status::error(ErrorKind::kIntegrity,
                         "unwrap: envelope does not authenticate (altered in transit, or made "
                         "for another key, volume or nonce)");
  }
  return secret;
}

}  // namespace keygate
