// The unlocker's TPM side: quotes bound to each request's binding value,
// the TPM share of a two-factor volume, and what enrollment registers.
#pragma once

#include <json/value.h>

#include <future>
#include <memory>
#include <mutex>
#include <string>

#include "core/encoding.h"
#include "core/secret.h"
#include "core/status.h"
#include "tpm/tpm_client.h"
#include "unlocker/token.h"

namespace keygate::unlocker {

class TpmAttester {
 public:
  TpmAttester(std::string tcti, TokenTpm config);
  ~TpmAttester();

  // Opens the TPM and makes the attestation key in the background.
  void start();
  // kRefused with a clear message when there is no TPM: the volume's policy
  // requires one.
  Status ready();

  // {"attest", "signature", "pcrs"} over the configured PCRs with `binding`
  // as qualifying data; at enrollment also "ak_public", "bank", "sealed".
  Result<Json::Value> evidence(const Bytes& binding, bool enrollment);

  // Two-factor volumes: the share sealed in this TPM.
  Result<SecretBuffer> unseal_share();
  // Enrollment of a two-factor volume: seals a new random share (returned)
  // and records the sealed object in the configuration.
  Result<SecretBuffer> seal_new_share();

  const TokenTpm& config() const { return config_; }

 private:
  Status open_locked();
  const std::string tcti_;
  TokenTpm config_;
  std::mutex mu_;
  std::future<Status> pending_;
  std::unique_ptr<tpm::Tpm> tpm_;
  Status open_status_;
  bool opened_ = false;
};

// The keyslot passphrase of a two-factor volume: server secret || TPM share.
Result<SecretBuffer> combine_shares(const SecretBuffer& server_secret, const SecretBuffer& tpm_share);

// "0,4,7" -> {0, 4, 7} (ascending, unique, each at most tpm::kMaxPcrIndex).
Result<std::vector<uint32_t>> parse_pcr_list(const std::string& text);

}  // namespace keygate::unlocker
