// The `keygate` LUKS2 token: the JSON a volume's header carries so that an
// unlock needs nothing else (servers, volume id, pinned CA, keyslot, TPM
// binding), and the rules for key server URLs wherever they are given.
#pragma once

#include <json/value.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace keygate::unlocker {

constexpr char kTokenType[] = "keygate";
constexpr size_t kMaxTokenServers = 8;
constexpr size_t kMaxServerUrlLength = 256;
constexpr size_t kMaxTokenJson = 16 * 1024;

// A key server URL, as a token holds it: https:// only (an http:// one
// would carry the enrollment token and the evidence in clear text), at most
// 256 printable ASCII characters. kInvalidArgument naming the URL otherwise.
Status check_server_url(const std::string& url);
// Servers given for a new enrollment: 1 to kMaxTokenServers URLs, each as
// above and with no query, fragment or user name (tokens written before
// that rule still parse); `option` names them in errors.
Status check_server_list(const std::vector<std::string>& urls, const char* option);

// A volume bound to the instance's TPM: unlocks carry a quote over these
// PCRs; with `sealed`, the keyslot secret is the server's secret followed by
// a share only this TPM unseals (at these PCR values).
struct TokenTpm {
  std::string bank = "sha256";
  std::vector<uint32_t> pcrs;
  uint32_t ak_handle = 0;  // a provider's persistent attestation key; 0: keygate's template
  std::vector<uint8_t> sealed;  // TPM2B_PUBLIC || TPM2B_PRIVATE; empty: no second factor

  Json::Value to_json() const;
  static Result<TokenTpm> from_json(const Json::Value& v);
};

// The `keygate` LUKS2 token: everything an unlock needs, stored in the header.
struct KeygateToken {
  std::vector<std::string> servers;  // tried in order
  std::string volume_id;
  std::string ca_pem;     // the CA the servers' TLS certificates chain to
  std::string ca_sha256;  // its pinned fingerprint
  int keyslot = -1;
  std::string attestation = "aws";  // the platform at enrollment (informational)
  std::optional<TokenTpm> tpm;

  Json::Value to_json() const;  // LUKS2 token JSON, "type": "keygate"
  // Validates every field, including that ca_pem's fingerprint is ca_sha256.
  static Result<KeygateToken> from_json(const Json::Value& v);
  // The one parser of a token's JSON text (the header's, the plugin's):
  // bounded to kMaxTokenJson bytes, then from_json.
  static Result<KeygateToken> parse(std::string_view json);
};

}  // namespace keygate::unlocker
