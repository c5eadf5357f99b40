#include "server/tpm_policy.h"

#include "core/json.h"
#include "core/protocol.h"
#include "tpm/tpm2_format.h"

namespace keygate::server {
namespace {

constexpr size_t kMaxField = 2048;

Result<Bytes> b64_field(const Json::Value& obj, const char* key) {
  auto text = json_string(obj, key, kMaxField);
  if (!text.is_ok()) return text.status().with_context("tpm");
  auto bytes = base64_decode(text.value());
  if (!bytes.is_ok() || bytes->empty()) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("tpm: '", key, "' is not base64"));
  }
  return bytes;
}

Result<std::map<uint32_t, Bytes>> pcr_values(const Json::Value& obj) {
  const Json::Value& p = obj[api::field::kTpmPcrs];
  if (!p.isObject() || p.empty() || p.size() > 24) {
    return Status::error(ErrorKind::kInvalidArgument, "tpm: 'pcrs' must map 1 to 24 PCRs to values");
  }
  std::map<uint32_t, Bytes> out;
  for (const auto& key : p.getMemberNames()) {
    bool index_ok = !key.empty() && key.size() <= 2 &&
                    key.find_first_not_of("0123456789") == std::string::npos &&
                    std::stoul(key) <= tpm::kMaxPcrIndex;
    auto value = p[key].isString() && p[key].asString().size() <= 128
                     ? hex_decode(p[key].asString())
                     : Result<Bytes>(Status::error(ErrorKind::kInvalidArgument, ""));
    if (!index_ok || !value.is_ok()) {
      return Status::error(ErrorKind::kInvalidArgument, str_cat("tpm: bad PCR entry '", key.substr(0, 8), "'"));
    }
    out[static_cast<uint32_t>(std::stoul(key))] = std::move(value).value();
  }
  return out;
}

// The quote itself: signed by `ak_public`, over `selection` in `bank`, with
// `binding` as its qualifying data; the PCR values it vouches for go to `values`.
Result<tpm::Attest> verify_quote(const Bytes& ak_public, uint16_t bank,
                                 const std::vector<uint32_t>& selection,
                                 const Json::Value& evidence, const Bytes& binding,
                                 std::map<uint32_t, Bytes>* values) {
  auto ak = tpm::parse_public(ak_public);
  if (!ak.is_ok()) return ak.status().with_context("registered attestation key");
  auto attest = b64_field(evidence, api::field::kTpmAttest);
  auto signature = b64_field(evidence, api::field::kTpmSignature);
  if (!attest.is_ok()) return attest.status();
  if (!signature.is_ok()) return signature.status();
  auto reported = pcr_values(evidence);
  if (!reported.is_ok()) return reported.status();
  tpm::QuoteCheck check;
  check.qualifying_data = binding;
  check.selection = {bank, selection};
  check.pcr_values = reported.value();
  auto verified = tpm::verify_quote(attest.value(), signature.value(), ak.value(), check);
  if (!verified.is_ok()) return verified.status();
  *values = std::move(reported).value();
  return verified;
}

}  // namespace

std::string TpmCheck::describe_mismatch() const {
  std::string out;
  for (uint32_t pcr : mismatched) {
    out += str_cat(out.empty() ? "" : ", ", "PCR ", pcr, "=", hex_encode(values.at(pcr)).substr(0, 16), "...");
  }
  return out;
}

Result<TpmCheck> check_tpm_evidence(const TpmPolicy& policy, const Json::Value& evidence,
                                    const Bytes& binding) {
  if (!evidence.isObject()) {
    return Status::error(ErrorKind::kInvalidArgument, "this volume's policy requires a TPM quote");
  }
  const uint16_t bank = tpm::hash_alg_from_name(policy.bank);
  if (bank == 0) return Status::error(ErrorKind::kInternal, "policy.tpm: unknown bank");
  TpmCheck out;
  auto verified = verify_quote(policy.ak_public, bank, policy.selection(), evidence, binding, &out.values);
  if (!verified.is_ok()) return verified.status();
  for (const auto& [pcr, accepted] : policy.pcrs) {
    const Bytes& got = out.values.at(pcr);
    bool ok = false;
    for (const Bytes& a : accepted) ok = ok || a == got;
    if (!ok) out.mismatched.push_back(pcr);
  }
  return out;
}

Result<TpmPolicy> tpm_policy_for_enrollment(const Json::Value& evidence, const Bytes& binding) {
  if (!evidence.isObject()) return Status::error(ErrorKind::kInvalidArgument, "tpm: not an object");
  TpmPolicy policy;
  auto ak = b64_field(evidence, api::field::kTpmAkPublic);
  if (!ak.is_ok()) return ak.status();
  auto parsed = tpm::parse_public(ak.value());
  if (!parsed.is_ok()) return parsed.status().with_context("tpm.ak_public");
  if (!parsed->restricted_signing()) {
    return Status::error(ErrorKind::kRefused,
                         "tpm: the attestation key is not a restricted signing key (it could sign "
                         "forged quotes)");
  }
  auto bank_name = json_string(evidence, api::field::kTpmBank, 16);
  const uint16_t bank = bank_name.is_ok() ? tpm::hash_alg_from_name(bank_name.value()) : 0;
  if (bank == 0) return Status::error(ErrorKind::kInvalidArgument, "tpm: 'bank' must be sha1, sha256, sha384 or sha512");
  auto reported = pcr_values(evidence);
  if (!reported.is_ok()) return reported.status();
  std::vector<uint32_t> selection;
  for (const auto& [pcr, value] : reported.value()) selection.push_back(pcr);
  std::map<uint32_t, Bytes> values;
  auto verified = verify_quote(ak.value(), bank, selection, evidence, binding, &values);
  if (!verified.is_ok()) return verified.status();
  policy.ak_public = std::move(ak).value();
  policy.bank = bank_name.value();
  for (auto& [pcr, value] : values) policy.pcrs[pcr] = {value};
  policy.sealed = evidence[api::field::kTpmSealed].isBool() && evidence[api::field::kTpmSealed].asBool();
  return policy;
}

}  // namespace keygate::server
