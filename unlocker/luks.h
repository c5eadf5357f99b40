// A LUKS2 device through libcryptsetup: keyslots, tokens, activation, offline
// encryption. The keygate token itself is token.h.
#pragma once

#include <json/value.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/secret.h"
#include "core/status.h"
#include "unlocker/token.h"

struct crypt_device;

namespace keygate::unlocker {

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

  // The keygate token, if any: (token id, token); the first by id.
  Result<std::optional<std::pair<int, KeygateToken>>> find_keygate_token();
  // The first `at_most` keygate tokens by id. More than one only while a
  // rotation is in progress (or was cut short): the new one beside the old.
  Result<std::vector<std::pair<int, KeygateToken>>> keygate_tokens(size_t at_most = 32);
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
