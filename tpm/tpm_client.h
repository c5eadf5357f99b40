// The instance's TPM through TPM2-TSS ESAPI: the attestation key, PCR reads,
// quotes, and sealing a secret under a PCR policy. The TCTI is linked in
// (device and swtpm), never loaded at run time, so a static build works.
//
// TCTI specs: "device:/dev/tpmrm0" (the default), "swtpm:host=H,port=P"
// (swtpm's socket interface, for tests).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/encoding.h"
#include "core/secret.h"
#include "core/status.h"

namespace keygate::tpm {

constexpr char kDefaultTcti[] = "device:/dev/tpmrm0";

struct Quote {
  Bytes attest;     // TPMS_ATTEST
  Bytes signature;  // TPMT_SIGNATURE
  std::map<uint32_t, Bytes> pcr_values;
};

class Tpm {
 public:
  // Opens the TPM. kNotFound when a device TCTI names a device that does not
  // exist (no TPM on this instance); kUnavailable when it does not answer.
  static Result<std::unique_ptr<Tpm>> open(const std::string& tcti);
  ~Tpm();
  Tpm(const Tpm&) = delete;
  Tpm& operator=(const Tpm&) = delete;

  // The attestation key: by default a restricted ECC P-256 signing key
  // created as a primary under the endorsement hierarchy from a fixed
  // template (the same key every boot, nothing stored); or the provider's
  // pre-provisioned key at a persistent handle (0x81xxxxxx). Returns its
  // TPMT_PUBLIC. Loaded once; later calls return the same.
  Result<Bytes> attestation_key(uint32_t persistent_handle = 0);

  Result<std::map<uint32_t, Bytes>> read_pcrs(uint16_t bank, const std::vector<uint32_t>& pcrs);

  // A quote over `pcrs` of `bank` with `qualifying_data` (at most 64 bytes),
  // signed by the attestation key, with the PCR values it covers.
  Result<Quote> quote(uint16_t bank, const std::vector<uint32_t>& pcrs,
                      const Bytes& qualifying_data);

  // Seals `data` (at most 128 bytes) to this TPM under a policy on the
  // current values of `pcrs`; returns TPM2B_PUBLIC || TPM2B_PRIVATE. Only
  // this TPM, with the same PCR values, unseals it.
  Result<Bytes> seal(const SecretBuffer& data, uint16_t bank, const std::vector<uint32_t>& pcrs);
  // kRefused when the PCRs no longer satisfy the policy (or another TPM).
  Result<SecretBuffer> unseal(const Bytes& blob, uint16_t bank, const std::vector<uint32_t>& pcrs);

  struct Impl;

 private:
  explicit Tpm(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace keygate::tpm
