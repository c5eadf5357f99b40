// Enrollment, the instance side: registering a volume with a key server and
// putting its keyslot and keygate token on the device. `keygate enroll`,
// `keygate encrypt` (after the in-place encryption) and `keygate rotate` all
// end in the same two-phase step: phase 1 registers a pending volume with the
// first server that answers; phase 2 adds the keyslot and the token, checks
// the new keyslot opens, and confirms with the server. A failure in phase 2
// undoes the keyslot and the token (or the whole format), so the device is
// as it was; the server's pending volume never unlocks.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "core/secret.h"
#include "core/status.h"
#include "unlocker/release.h"
#include "unlocker/token.h"

namespace keygate::unlocker {

// Where enrollment registers and what the token records, validated: every
// URL https:// (token.h's rules), 1 to kMaxTokenServers of each, and a CA
// that parses, with its pinned fingerprint.
struct ServerChoice {
  std::vector<std::string> servers;        // asked now, in order
  std::vector<std::string> token_servers;  // recorded in the token, in unlock order
  std::string ca_pem;
  std::string ca_sha256;
};
Result<ServerChoice> choose_servers(std::vector<std::string> servers,
                                    std::vector<std::string> token_servers, std::string ca_pem);

enum class TpmMode { kOff, kAuto, kRequired };

struct EnrollRequest {
  std::string device;
  ServerChoice servers;
  SecretBuffer enrollment_token;  // empty: enrollment by attestation
  bool format = false;            // the device is blank: format it first
  int sector_size = 512;
  std::optional<SecretBuffer> recovery;  // with format: a recovery keyslot
  std::optional<SecretBuffer> existing;  // without format: a passphrase the device opens with
  bool with_evidence = true;             // false: image builders (no instance evidence)
  std::string description;
  ReleaseSettings settings;  // metadata service, platform, TPM interface, request timeout
  TpmMode tpm_mode = TpmMode::kOff;
  TokenTpm tpm;           // bank, PCRs, attestation key handle
  bool tpm_seal = false;  // two factors (implies kRequired)
};

struct Enrolled {
  std::string volume_id;
  int keyslot = -1;
  int token_id = -1;
};

// Every input is checked (the device blank, or enrolled nowhere yet and
// opened by `existing`) before anything is changed.
Result<Enrolled> enroll_volume(const EnrollRequest& request);

struct RotateRequest {
  std::string device;
  // Unset: the volume's own servers and CA.
  std::optional<std::vector<std::string>> servers, token_servers;
  std::optional<std::string> ca_pem;
  SecretBuffer enrollment_token;  // empty: by attestation
  std::string description;        // empty: "rotated from <old volume>"
  ReleaseSettings settings;
};

struct Rotated {
  std::string old_volume_id;
  std::string volume_id;
  int keyslot = -1;
};

// Moves the device from its current key (released exactly as a boot gets
// it) to a newly registered volume of its own. The old keyslot and token go
// only once the new ones are in place and confirmed.
Result<Rotated> rotate_volume(const RotateRequest& request);

}  // namespace keygate::unlocker
