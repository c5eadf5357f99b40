// TPM 2.0 structures the key server reads, parsed defensively (every length
// bounded, every byte consumed, no allocation driven by input beyond fixed
// limits), and quote verification on OpenSSL alone: the server never needs a
// TSS. Layouts are TPM 2.0 Library Part 2 (big-endian).
#pragma once

#include <openssl/evp.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/encoding.h"
#include "core/status.h"

namespace keygate::tpm {

constexpr uint32_t kTpmGenerated = 0xff544347;  // TPM_GENERATED_VALUE
constexpr uint16_t kStAttestQuote = 0x8018;     // TPM_ST_ATTEST_QUOTE

constexpr uint16_t kAlgRsa = 0x0001;
constexpr uint16_t kAlgSha1 = 0x0004;
constexpr uint16_t kAlgSha256 = 0x000b;
constexpr uint16_t kAlgSha384 = 0x000c;
constexpr uint16_t kAlgSha512 = 0x000d;
constexpr uint16_t kAlgNull = 0x0010;
constexpr uint16_t kAlgRsassa = 0x0014;
constexpr uint16_t kAlgRsapss = 0x0016;
constexpr uint16_t kAlgEcdsa = 0x0018;
constexpr uint16_t kAlgEcc = 0x0023;
constexpr uint16_t kEccNistP256 = 0x0003;
constexpr uint16_t kEccNistP384 = 0x0004;

constexpr uint32_t kMaxPcrIndex = 23;
constexpr size_t kMaxAttestSize = 1024;
constexpr size_t kMaxSignatureSize = 1024;
constexpr size_t kMaxPublicSize = 1024;

// "sha1", "sha256", "sha384", "sha512" <-> TPM_ALG_ID; 0 / "" when unknown.
uint16_t hash_alg_from_name(std::string_view name);
std::string hash_alg_name(uint16_t alg);
// Digest size of a hash algorithm, 0 when unknown.
size_t hash_size(uint16_t alg);

struct PcrSelection {
  uint16_t hash_alg = 0;
  std::vector<uint32_t> pcrs;  // ascending
};

struct Attest {  // TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE
  Bytes qualified_signer;
  Bytes extra_data;
  uint64_t clock = 0;
  uint32_t reset_count = 0;
  uint32_t restart_count = 0;
  bool safe = false;
  uint64_t firmware_version = 0;
  std::vector<PcrSelection> selections;
  Bytes pcr_digest;
};

struct Signature {  // TPMT_SIGNATURE
  uint16_t sig_alg = 0;   // RSASSA, RSAPSS or ECDSA
  uint16_t hash_alg = 0;
  Bytes rsa;              // RSA signature
  Bytes ecdsa_r, ecdsa_s;
};

struct PkeyDeleter {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyDeleter>;

struct PublicKey {  // TPMT_PUBLIC of a signing key
  uint16_t type = 0;       // RSA or ECC
  uint16_t name_alg = 0;
  uint32_t attributes = 0;
  Bytes name;              // nameAlg || H(TPMT_PUBLIC)
  PkeyPtr key;             // the public key for OpenSSL
  bool restricted_signing() const;  // restricted, sign, !decrypt
};

// Each parser takes the whole buffer and fails with kInvalidArgument on any
// malformed or trailing byte.
Result<Attest> parse_attest(const Bytes& data);
Result<Signature> parse_signature(const Bytes& data);
Result<PublicKey> parse_public(const Bytes& data);

// The PCR digest a quote must carry: H(values in selection order), with the
// quote's signing hash.
Bytes pcr_digest(uint16_t hash_alg, const std::vector<Bytes>& values_in_order);

struct QuoteCheck {
  Bytes qualifying_data;                    // must equal extraData
  PcrSelection selection;                   // must equal the quote's selection exactly
  std::map<uint32_t, Bytes> pcr_values;     // reported values, one per selected PCR
};

// Verifies a quote: TPM_GENERATED magic and quote type, the signature with
// `ak` (RSASSA, RSAPSS or ECDSA; SHA-256/384/512), qualifying data, the
// selection, and that the PCR digest is the hash of the reported values.
// Malformed input is kInvalidArgument; anything that does not verify is
// kIntegrity; a quote over another nonce is kRefused.
Result<Attest> verify_quote(const Bytes& attest, const Bytes& signature, const PublicKey& ak,
                            const QuoteCheck& check);

}  // namespace keygate::tpm
