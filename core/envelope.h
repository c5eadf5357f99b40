// The wrap envelope: how a volume secret travels from server to client.
//
//   shared  = X25519(server ephemeral private, client ephemeral public)
//   key     = HKDF-SHA256(ikm=shared, salt=nonce,
//                         info="keygate-v1 wrap" || client_pub || server_pub)
//   sealed  = AES-256-GCM(key, secret, aad="keygate-v1" || len(volume_id) || volume_id || nonce)
//
// Only the holder of the client's ephemeral private key can open it, and an
// envelope made for one volume or nonce does not open for another.
#pragma once

#include <json/value.h>

#include <string>

#include "core/crypto.h"

namespace keygate {

constexpr char kEnvelopeAlgorithm[] = "X25519-HKDF-SHA256-A256GCM";

struct WrappedSecret {
  Bytes server_public;  // 32 bytes
  Bytes sealed;         // iv || ciphertext || tag

  Json::Value to_json() const;
  // Validates sizes and the algorithm name.
  static Result<WrappedSecret> from_json(const Json::Value& value);
};

// The value evidence is bound to:
// SHA-256("keygate-v1" || nonce || client_public_key || volume_id).
Bytes binding_value(const Bytes& nonce, const Bytes& client_public_key,
                    std::string_view volume_id);

Result<WrappedSecret> wrap_secret_for_client(const SecretBuffer& secret,
                                             const Bytes& client_public_key,
                                             std::string_view volume_id, const Bytes& nonce);

// Fails with kIntegrity if the envelope was altered or made for another
// key, volume or nonce.
Result<SecretBuffer> unwrap_secret(const WrappedSecret& wrapped, const X25519KeyPair& client,
                                   std::string_view volume_id, const Bytes& nonce);

}  // namespace keygate
