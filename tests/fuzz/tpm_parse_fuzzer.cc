// libFuzzer target for the TPM structures the key server reads from the
// network: TPMS_ATTEST, TPMT_SIGNATURE, TPMT_PUBLIC, and quote verification
// with a real attestation key. Built and run by tests/fuzz/run.sh.
#include <cstdint>
#include <fstream>
#include <iterator>

#include "tpm/tpm2_format.h"

using namespace keygate;

namespace {

tpm::PublicKey* g_ak = nullptr;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  std::ifstream in(KEYGATE_FIXTURES "/tpm/gce-cos85.ak.tpmt_public.bin", std::ios::binary);
  Bytes pub((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto ak = tpm::parse_public(pub);
  if (!ak.is_ok()) abort();
  g_ak = new tpm::PublicKey(std::move(ak).value());
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Bytes input(data, data + size);
  (void)tpm::parse_attest(input);
  (void)tpm::parse_signature(input);
  (void)tpm::parse_public(input);
  if (size >= 2) {
    // The first byte splits the rest into attest and signature.
    const size_t cut = 1 + (data[0] * (size - 1)) / 255;
    const Bytes attest(data + 1, data + cut);
    const Bytes signature(data + cut, data + size);
    tpm::QuoteCheck check;
    check.qualifying_data = {0x90, 0x09};
    check.selection.hash_alg = tpm::kAlgSha256;
    for (uint32_t i = 0; i <= 23; ++i) {
      check.selection.pcrs.push_back(i);
      check.pcr_values[i] = Bytes(32, static_cast<uint8_t>(i));
    }
    (void)tpm::verify_quote(attest, signature, *g_ak, check);
  }
  return 0;
}
