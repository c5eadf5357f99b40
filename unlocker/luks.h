// A LUKS2 device through libcryptsetup, and keygate's LUKS2 token.
#pragma once

#include <json/value.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/secret.h"
#include "core/status.h"

struct crypt_device;

namespace keygate::unlocker {

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
};

// Keyslot cost for the 32-byte random secret: PBKDF2 at the minimum, since a
// password KDF adds nothing to a high-entropy key.
// Recovery passphrases: argon2id with memory bounded so small instances can
// open them.
enum class KeyslotCost { kHighEntropySecret, kRecoveryPassphrase };

class LuksDevice {
 public:
  ~LuksDevice();
  LuksDevice(LuksDevice&&) noexcept;
  LuksDevice& operator=(LuksDevice&&) noexcept;

  // Loads an existing LUKS2 header from `path` (a block device or file).
  static Result<LuksDevice> open(const std::string& path);
  // Formats `path` as LUKS2 (aes-xts-plain64, 512-bit volume key).
  static Result<LuksDevice> format(const std::string& path, int sector_size);

  const std::string& path() const { return path_; }

  // The keygate token, if any: (token id, token).
  Result<std::optional<std::pair<int, KeygateToken>>> find_keygate_token();
  Result<int> add_token(const KeygateToken& token);
  Status remove_token(int token_id);

  // Right after format(): a keyslot from the in-memory volume key.
  Result<int> add_keyslot_after_format(const SecretBuffer& passphrase, KeyslotCost cost);
  // On an existing volume: a keyslot unlocked by `existing` passphrase.
  Result<int> add_keyslot(const SecretBuffer& existing, const SecretBuffer& passphrase,
                          KeyslotCost cost);
  Status destroy_keyslot(int keyslot);

  // Activates the mapping `name` with `passphrase` in `keyslot` (any slot if
  // -1). With an empty name only checks that the passphrase opens the slot
  // (libcryptsetup's verify-only activation; needs no device-mapper).
  // Returns the keyslot used. A wrong passphrase is kRefused.
  Result<int> activate(const std::string& name, int keyslot, const SecretBuffer& passphrase);

  // Describes keyslots and tokens, for `keygate status`.
  Json::Value describe();

  // Overwrites the whole LUKS2 header area with zeros: used only to undo a
  // format() this run made on a blank device.
  Status erase_header();

 private:
  LuksDevice(crypt_device* cd, std::string path) : cd_(cd), path_(std::move(path)) {}
  crypt_device* cd_ = nullptr;
  std::string path_;
};

// Encrypts the plaintext on `path` in place (LUKS2 offline encryption with a
// data shift, no device-mapper needed): the LUKS2 header takes the first
// `reduce_bytes / 2` and the last `reduce_bytes` of `path` must be unused.
// The volume opens with `passphrase` (argon2id, bounded memory). An
// interrupted run is resumed by calling again with the same passphrase.
// `progress` gets (bytes done, total) as the work advances.
Status encrypt_in_place(const std::string& path, const SecretBuffer& passphrase,
                        uint64_t reduce_bytes,
                        const std::function<void(uint64_t, uint64_t)>& progress);

// Fails if `path` holds any recognised filesystem, partition table or RAID
// signature (libblkid), so --format never destroys data.
Status check_device_blank(const std::string& path);

// Routes libcryptsetup's messages to keygate's log.
void install_cryptsetup_logging(bool debug);

}  // namespace keygate::unlocker
