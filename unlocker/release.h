// The release path, the one every entry point takes (`keygate unlock`,
// `keygate keyscript`, `keygate rotate`'s current key and the LUKS2 token
// plugin): the settings it runs with, platform detection, the TPM, the key
// servers with retries, and a two-factor volume's TPM share, ending in the
// keyslot passphrase or a classified failure.
#pragma once

#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <string>

#include "core/secret.h"
#include "core/status.h"
#include "unlocker/evidence.h"
#include "unlocker/luks.h"
#include "unlocker/token.h"

namespace keygate::unlocker {

// keygate's exit statuses (the usage text and the README list them).
enum class Outcome {
  kOk = 0,
  kInternal = 1,
  kConfig = 2,       // usage or bad configuration
  kRefused = 3,      // the key server's policy said no
  kUnreachable = 4,  // no key server reachable (network, timeout, server error)
  kUntrusted = 5,    // TLS identity not the pinned CA, or a released key that failed authentication
  kVolume = 6,       // not LUKS2, no keygate token, the key does not open the keyslot
};

// The classification of a failure, from its kind: every failure of the
// release path carries the kind its outcome is (volume failures kIo,
// kNotFound or kConflict; configuration kInvalidArgument).
Outcome outcome_for(const Status& status);
inline int exit_code(Outcome o) { return static_cast<int>(o); }
// A failure of the device (libcryptsetup, libblkid, the header's token) as
// a volume failure, whatever kind its library gave it; a token whose CA does
// not match its pin stays untrusted.
Status as_volume_failure(const Status& status);
// "refused", "unreachable", ... (the token plugin says which, as its caller
// sees only libcryptsetup's errno).
const char* outcome_name(Outcome o);

// Who asks: the defaults differ in one respect only, the deadline.
enum class EntryPoint {
  kCommand,      // keygate unlock / keyscript / rotate: run by scripts that
                 // pass their own deadline (the initramfs: 120 s); by hand,
                 // one pass over the servers
  kTokenPlugin,  // libcryptsetup's plugin: run unattended at boot by
                 // systemd-cryptsetup, often before the key server answers
};

// What a release runs with. Each setting is taken from the command line
// (`--metadata-url` ...), else from the environment (KEYGATE_METADATA_URL,
// KEYGATE_PLATFORM, KEYGATE_TCTI, KEYGATE_TIMEOUT, KEYGATE_DEADLINE: the only
// settings the token plugin has), else these defaults.
struct ReleaseSettings {
  static constexpr long kDefaultTimeoutSeconds = 5;
  static constexpr long kDefaultDeadlineSeconds = 0;         // kCommand: one pass
  static constexpr long kPluginDefaultDeadlineSeconds = 30;  // kTokenPlugin
  static constexpr long kMaxTimeoutSeconds = 600;
  static constexpr long kMaxDeadlineSeconds = 3600;

  std::string metadata_url = kDefaultMetadataUrl;
  std::optional<Platform> platform;  // unset: detected
  std::string tcti;                  // the TPM of TPM-bound volumes
  long request_timeout_ms = kDefaultTimeoutSeconds * 1000;
  long deadline_ms = kDefaultDeadlineSeconds * 1000;
};

// A command-line option's value, or nullopt when it was not given.
using OptionLookup = std::function<std::optional<std::string>(const char* option)>;

// Reads the settings as above; a malformed value is kInvalidArgument naming
// the option or variable it came from (never silently a default).
Result<ReleaseSettings> read_release_settings(EntryPoint entry, const OptionLookup& option);

// One release. Construction starts platform detection (and AWS's document
// fetch) and the TLS set-up on threads, so they overlap reading the header.
class Release {
 public:
  explicit Release(const ReleaseSettings& settings);
  ~Release();
  Release(const Release&) = delete;
  Release& operator=(const Release&) = delete;

  // The keyslot passphrase for `token`'s volume: the servers' secret, or for
  // a two-factor volume that secret and this TPM's share together.
  Result<SecretBuffer> passphrase_for(const KeygateToken& token);

 private:
  ReleaseSettings settings_;
  std::unique_ptr<EvidenceCollector> evidence_;
  std::future<void> https_ready_;
};

// A device whose keygate keyslot's passphrase has been released.
struct ReleasedVolume {
  LuksDevice device;
  int token_id = -1;
  KeygateToken token;
  SecretBuffer passphrase;
  int keyslot = -1;  // the keyslot the passphrase opened
};

// How often release_volume reads a header again that changed under it.
constexpr int kMaxHeaderRereads = 2;

// Opens `device`, reads its keygate token, releases its passphrase and opens
// the token's keyslot with it: as the mapping `activate_as`, or, when that
// is empty, only to check it (verify-only activation). During a rotation the
// device has two tokens: each is tried in id order, a refusal or a key that
// misses moving on to the next. If none opens because the header changed
// meanwhile (a rotation finished), it is read again, up to
// kMaxHeaderRereads times. Otherwise the first token's failure is returned:
// a refusal as the server gave it, a key that misses as a volume failure.
Result<ReleasedVolume> release_volume(const std::string& device, const ReleaseSettings& settings,
                                      const std::string& activate_as = "");

}  // namespace keygate::unlocker
