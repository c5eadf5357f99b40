#include "tpm/tpm2_format.h"

#include <openssl/ecdsa.h>
#include <openssl/rsa.h>

#include <algorithm>

#include "core/crypto.h"
#include "core/pkey.h"

namespace keygate::tpm {
namespace {

// A bounds-checked big-endian reader; the first failure sticks.
class Reader {
 public:
  explicit Reader(const Bytes& data) : data_(data) {}
  bool ok() const { return ok_; }
  bool done() const { return ok_ && pos_ == data_.size(); }
  uint8_t u8() { return static_cast<uint8_t>(take(1)); }
  uint16_t u16() { return static_cast<uint16_t>(take(2)); }
  uint32_t u32() { return static_cast<uint32_t>(take(4)); }
  uint64_t u64() { return take(8); }
  // A TPM2B: u16 size, then at most `max` bytes.
  Bytes sized(size_t max) {
    size_t n = u16();
    return raw(n > max ? (ok_ = false, 0) : n);
  }
  Bytes raw(size_t n) {
    if (!ok_ || n > data_.size() - pos_) {
      ok_ = false;
      return {};
    }
    Bytes out(data_.begin() + static_cast<long>(pos_), data_.begin() + static_cast<long>(pos_ + n));
    pos_ += n;
    return out;
  }

 private:
  uint64_t take(size_t n) {
    if (!ok_ || n > data_.size() - pos_) {
      ok_ = false;
      return 0;
    }
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) v = (v << 8) | data_[pos_++];
    return v;
  }
  const Bytes& data_;
  size_t pos_ = 0;
  bool ok_ = true;
};

Status malformed(const char* what) {
  return Status::error(ErrorKind::kInvalidArgument, str_cat("TPM ", what, ": malformed"));
}

const EVP_MD* md_for(uint16_t alg) {
  switch (alg) {
    case kAlgSha1: return EVP_sha1();
    case kAlgSha256: return EVP_sha256();
    case kAlgSha384: return EVP_sha384();
    case kAlgSha512: return EVP_sha512();
  }
  return nullptr;
}

Bytes digest(uint16_t alg, const uint8_t* data, size_t size) {
  const EVP_MD* md = md_for(alg);
  Bytes out(static_cast<size_t>(EVP_MD_get_size(md)));
  unsigned int len = 0;
  EVP_Digest(data, size, out.data(), &len, md, nullptr);
  out.resize(len);
  return out;
}

// TPMT_SYM_DEF_OBJECT: a signing key's is TPM_ALG_NULL.
bool read_symmetric(Reader& r) {
  uint16_t alg = r.u16();
  if (alg == kAlgNull) return true;
  r.u16();  // keyBits
  r.u16();  // mode
  return r.ok();
}

// A scheme: TPM_ALG_NULL, or an algorithm followed by its hash.
bool read_scheme(Reader& r, uint16_t* scheme, uint16_t* hash) {
  *scheme = r.u16();
  *hash = 0;
  if (*scheme != kAlgNull) *hash = r.u16();
  return r.ok();
}

}  // namespace

uint16_t hash_alg_from_name(std::string_view name) {
  if (name == "sha1") return kAlgSha1;
  if (name == "sha256") return kAlgSha256;
  if (name == "sha384") return kAlgSha384;
  if (name == "sha512") return kAlgSha512;
  return 0;
}

std::string hash_alg_name(uint16_t alg) {
  switch (alg) {
    case kAlgSha1: return "sha1";
    case kAlgSha256: return "sha256";
    case kAlgSha384: return "sha384";
    case kAlgSha512: return "sha512";
  }
  return "";
}

size_t hash_size(uint16_t alg) {
  switch (alg) {
    case kAlgSha1: return 20;
    case kAlgSha256: return 32;
    case kAlgSha384: return 48;
    case kAlgSha512: return 64;
  }
  return 0;
}

bool PublicKey::restricted_signing() const {
  constexpr uint32_t kRestricted = 1u << 16, kDecrypt = 1u << 17, kSign = 1u << 18;
  return (attributes & kRestricted) && (attributes & kSign) && !(attributes & kDecrypt);
}

Result<Attest> parse_attest(const Bytes& data) {
  if (data.empty() || data.size() > kMaxAttestSize) return malformed("attest (size)");
  Reader r(data);
  Attest a;
  uint32_t magic = r.u32();
  uint16_t type = r.u16();
  if (!r.ok()) return malformed("attest");
  if (magic != kTpmGenerated) {
    return Status::error(ErrorKind::kIntegrity, "TPM attest: not TPM-generated (magic)");
  }
  if (type != kStAttestQuote) {
    return Status::error(ErrorKind::kIntegrity, "TPM attest: not a quote");
  }
  a.qualified_signer = r.sized(2 + 64);
  a.extra_data = r.sized(64);
  a.clock = r.u64();
  a.reset_count = r.u32();
  a.restart_count = r.u32();
  uint8_t safe = r.u8();
  a.safe = safe == 1;
  a.firmware_version = r.u64();
  uint32_t count = r.u32();
  if (!r.ok() || safe > 1 || count == 0 || count > 4) return malformed("attest (selection)");
  for (uint32_t i = 0; i < count; ++i) {
    PcrSelection sel;
    sel.hash_alg = r.u16();
    uint8_t size = r.u8();
    if (!r.ok() || size < 1 || size > 4 || hash_size(sel.hash_alg) == 0) {
      return malformed("attest (selection)");
    }
    Bytes bitmap = r.raw(size);
    for (uint32_t pcr = 0; pcr < size * 8u && r.ok(); ++pcr) {
      if (bitmap[pcr / 8] & (1u << (pcr % 8))) {
        if (pcr > kMaxPcrIndex) return malformed("attest (PCR index)");
        sel.pcrs.push_back(pcr);
      }
    }
    a.selections.push_back(std::move(sel));
  }
  a.pcr_digest = r.sized(64);
  if (!r.done()) return malformed("attest");
  return a;
}

Result<Signature> parse_signature(const Bytes& data) {
  if (data.empty() || data.size() > kMaxSignatureSize) return malformed("signature (size)");
  Reader r(data);
  Signature s;
  s.sig_alg = r.u16();
  s.hash_alg = r.u16();
  if (!r.ok()) return malformed("signature");
  switch (s.sig_alg) {
    case kAlgRsassa:
    case kAlgRsapss:
      s.rsa = r.sized(512);
      break;
    case kAlgEcdsa:
      s.ecdsa_r = r.sized(66);
      s.ecdsa_s = r.sized(66);
      break;
    default:
      return Status::error(ErrorKind::kIntegrity, "TPM signature: unsupported scheme");
  }
  if (!r.done()) return malformed("signature");
  return s;
}

Result<PublicKey> parse_public(const Bytes& data) {
  if (data.empty() || data.size() > kMaxPublicSize) return malformed("public key (size)");
  Reader r(data);
  PublicKey pk;
  pk.type = r.u16();
  pk.name_alg = r.u16();
  pk.attributes = r.u32();
  r.sized(64);  // authPolicy
  if (!r.ok() || hash_size(pk.name_alg) == 0 || pk.name_alg == kAlgSha1) {
    return malformed("public key");
  }
  uint16_t scheme = 0, scheme_hash = 0;
  if (pk.type == kAlgRsa) {
    if (!read_symmetric(r) || !read_scheme(r, &scheme, &scheme_hash)) return malformed("public key");
    uint16_t bits = r.u16();
    uint32_t exponent = r.u32();
    Bytes n = r.sized(512);
    if (!r.done() || n.size() * 8 != bits) return malformed("public key (RSA)");
    if (scheme != kAlgNull && scheme != kAlgRsassa && scheme != kAlgRsapss) {
      return Status::error(ErrorKind::kInvalidArgument, "TPM public key: not an RSA signing key");
    }
    Bytes e = exponent == 0 ? Bytes{0x01, 0x00, 0x01}
                            : Bytes{static_cast<uint8_t>(exponent >> 24),
                                    static_cast<uint8_t>(exponent >> 16),
                                    static_cast<uint8_t>(exponent >> 8),
                                    static_cast<uint8_t>(exponent)};
    while (e.size() > 1 && e[0] == 0) e.erase(e.begin());
    auto key = rsa_public_key(n, e);
    if (!key.is_ok()) return key.status().with_context("TPM public key");
    pk.key.reset(key->release());
  } else if (pk.type == kAlgEcc) {
    if (!read_symmetric(r) || !read_scheme(r, &scheme, &scheme_hash)) return malformed("public key");
    uint16_t curve = r.u16();
    uint16_t kdf = 0, kdf_hash = 0;
    read_scheme(r, &kdf, &kdf_hash);
    Bytes x = r.sized(66), y = r.sized(66);
    if (!r.done()) return malformed("public key (ECC)");
    if (scheme != kAlgNull && scheme != kAlgEcdsa) {
      return Status::error(ErrorKind::kInvalidArgument, "TPM public key: not an ECDSA signing key");
    }
    const char* group = curve == kEccNistP256 ? "P-256" : curve == kEccNistP384 ? "P-384" : nullptr;
    if (group == nullptr) return Status::error(ErrorKind::kInvalidArgument, "TPM public key: unsupported curve");
    auto key = ec_public_key(group, x, y);
    if (!key.is_ok()) return key.status().with_context("TPM public key");
    pk.key.reset(key->release());
  } else {
    return Status::error(ErrorKind::kInvalidArgument, "TPM public key: neither RSA nor ECC");
  }
  Bytes h = digest(pk.name_alg, data.data(), data.size());
  pk.name = {static_cast<uint8_t>(pk.name_alg >> 8), static_cast<uint8_t>(pk.name_alg)};
  pk.name.insert(pk.name.end(), h.begin(), h.end());
  return pk;
}

Bytes pcr_digest(uint16_t hash_alg, const std::vector<Bytes>& values_in_order) {
  Bytes all;
  for (const Bytes& v : values_in_order) all.insert(all.end(), v.begin(), v.end());
  return digest(hash_alg, all.data(), all.size());
}

Result<Attest> verify_quote(const Bytes& attest_bytes, const Bytes& signature_bytes,
                            const PublicKey& ak, const QuoteCheck& check) {
  auto attest = parse_attest(attest_bytes);
  if (!attest.is_ok()) return attest.status();
  auto sig = parse_signature(signature_bytes);
  if (!sig.is_ok()) return sig.status();
  if (!ak.key) return Status::error(ErrorKind::kInvalidArgument, "TPM quote: no attestation key");
  if (sig->hash_alg != kAlgSha256 && sig->hash_alg != kAlgSha384 && sig->hash_alg != kAlgSha512) {
    return Status::error(ErrorKind::kIntegrity, "TPM quote: signature hash must be SHA-256 or stronger");
  }
  const bool rsa_key = ak.type == kAlgRsa;
  if (rsa_key != (sig->sig_alg == kAlgRsassa || sig->sig_alg == kAlgRsapss)) {
    return Status::error(ErrorKind::kIntegrity, "TPM quote: signature scheme does not match the key");
  }
  Bytes der_sig;
  if (rsa_key) {
    if (sig->rsa.size() != static_cast<size_t>(EVP_PKEY_get_size(ak.key.get()))) {
      return Status::error(ErrorKind::kIntegrity, "TPM quote: signature does not verify");
    }
    der_sig = sig->rsa;
  } else {
    std::unique_ptr<ECDSA_SIG, decltype(&ECDSA_SIG_free)> es(ECDSA_SIG_new(), ECDSA_SIG_free);
    BIGNUM* r = BN_bin2bn(sig->ecdsa_r.data(), static_cast<int>(sig->ecdsa_r.size()), nullptr);
    BIGNUM* s = BN_bin2bn(sig->ecdsa_s.data(), static_cast<int>(sig->ecdsa_s.size()), nullptr);
    if (!es || !r || !s || ECDSA_SIG_set0(es.get(), r, s) != 1) {
      BN_free(r);
      BN_free(s);
      return Status::error(ErrorKind::kInternal, "TPM quote: out of memory");
    }
    int len = i2d_ECDSA_SIG(es.get(), nullptr);
    der_sig.resize(static_cast<size_t>(len > 0 ? len : 0));
    uint8_t* p = der_sig.data();
    i2d_ECDSA_SIG(es.get(), &p);
  }
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> md(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_PKEY_CTX* pctx = nullptr;
  if (!md || EVP_DigestVerifyInit(md.get(), &pctx, md_for(sig->hash_alg), nullptr, ak.key.get()) != 1) {
    return Status::error(ErrorKind::kInternal, "TPM quote: verifier setup failed");
  }
  if (rsa_key) {
    EVP_PKEY_CTX_set_rsa_padding(pctx, sig->sig_alg == kAlgRsapss ? RSA_PKCS1_PSS_PADDING : RSA_PKCS1_PADDING);
    if (sig->sig_alg == kAlgRsapss) EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_AUTO);
  }
  if (EVP_DigestVerify(md.get(), der_sig.data(), der_sig.size(), attest_bytes.data(),
                       attest_bytes.size()) != 1) {
    openssl_last_error();
    return Status::error(ErrorKind::kIntegrity, "TPM quote: signature does not verify");
  }
  // Signed by the attestation key: now what it says.
  if (attest->extra_data != check.qualifying_data) {
    return Status::error(ErrorKind::kRefused,
                         "TPM quote: qualifying data is not this challenge's binding (a replay?)");
  }
  if (attest->selections.size() != 1 || attest->selections[0].hash_alg != check.selection.hash_alg ||
      attest->selections[0].pcrs != check.selection.pcrs) {
    return Status::error(ErrorKind::kIntegrity, "TPM quote: PCR selection is not the policy's");
  }
  std::vector<Bytes> values;
  for (uint32_t pcr : check.selection.pcrs) {
    auto it = check.pcr_values.find(pcr);
    if (it == check.pcr_values.end() || it->second.size() != hash_size(check.selection.hash_alg)) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("TPM quote: no ", hash_alg_name(check.selection.hash_alg),
                                   " value reported for PCR ", pcr));
    }
    values.push_back(it->second);
  }
  if (check.pcr_values.size() != check.selection.pcrs.size()) {
    return Status::error(ErrorKind::kInvalidArgument, "TPM quote: values reported for unselected PCRs");
  }
  if (!constant_time_equal(pcr_digest(sig->hash_alg, values), attest->pcr_digest)) {
    return Status::error(ErrorKind::kIntegrity,
                         "TPM quote: reported PCR values do not match the quoted digest");
  }
  return attest;
}

}  // namespace keygate::tpm
