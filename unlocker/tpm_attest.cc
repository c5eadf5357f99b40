#include "unlocker/tpm_attest.h"

#include <algorithm>
#include <cstring>

#include "core/protocol.h"
#include "tpm/tpm2_format.h"

namespace keygate::unlocker {

TpmAttester::TpmAttester(std::string tcti, TokenTpm config)
    : tcti_(std::move(tcti)), config_(std::move(config)) {}

TpmAttester::~TpmAttester() {
  if (pending_.valid()) pending_.wait();
}

Status TpmAttester::open_locked() {
  if (opened_) return open_status_;
  opened_ = true;
  auto t = tpm::Tpm::open(tcti_);
  if (!t.is_ok()) {
    open_status_ = t.status().kind() == ErrorKind::kNotFound
                       ? Status::error(ErrorKind::kRefused,
                                       str_cat("this volume is bound to a TPM, but none is available (",
                                               t.status().message(), ")"))
                       : t.status();
    return open_status_;
  }
  tpm_ = std::move(t).value();
  auto ak = tpm_->attestation_key(config_.ak_handle);
  if (!ak.is_ok()) open_status_ = ak.status();
  return open_status_;
}

void TpmAttester::start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (opened_ || pending_.valid()) return;
  pending_ = std::async(std::launch::async, [this]() {
    std::lock_guard<std::mutex> inner(mu_);
    return open_locked();
  });
}

Status TpmAttester::ready() {
  if (pending_.valid()) {
    Status s = pending_.get();
    if (!s.is_ok()) return s;
  }
  std::lock_guard<std::mutex> lock(mu_);
  return open_locked();
}

Result<Json::Value> TpmAttester::evidence(const Bytes& binding, bool enrollment) {
  KEYGATE_RETURN_IF_ERROR(ready());
  std::lock_guard<std::mutex> lock(mu_);
  const uint16_t bank = tpm::hash_alg_from_name(config_.bank);
  auto q = tpm_->quote(bank, config_.pcrs, binding);
  if (!q.is_ok()) return q.status();
  Json::Value e(Json::objectValue);
  e[api::field::kTpmAttest] = base64_encode(q->attest);
  e[api::field::kTpmSignature] = base64_encode(q->signature);
  for (const auto& [pcr, value] : q->pcr_values) e[api::field::kTpmPcrs][std::to_string(pcr)] = hex_encode(value);
  if (enrollment) {
    e[api::field::kTpmAkPublic] = base64_encode(tpm_->attestation_key(config_.ak_handle).value());
    e[api::field::kTpmBank] = config_.bank;
    e[api::field::kTpmSealed] = !config_.sealed.empty();
  }
  return e;
}

Result<SecretBuffer> TpmAttester::unseal_share() {
  KEYGATE_RETURN_IF_ERROR(ready());
  std::lock_guard<std::mutex> lock(mu_);
  auto share = tpm_->unseal(config_.sealed, tpm::hash_alg_from_name(config_.bank), config_.pcrs);
  if (!share.is_ok()) {
    return Status::error(ErrorKind::kRefused,
                         str_cat("the TPM share of this two-factor volume cannot be unsealed "
                                 "(PCR values changed since enrollment, or another TPM): ",
                                 share.status().message()));
  }
  return share;
}

Result<SecretBuffer> TpmAttester::seal_new_share() {
  KEYGATE_RETURN_IF_ERROR(ready());
  std::lock_guard<std::mutex> lock(mu_);
  auto share = SecretBuffer::random(32);
  if (!share.is_ok()) return share.status();
  auto blob = tpm_->seal(share.value(), tpm::hash_alg_from_name(config_.bank), config_.pcrs);
  if (!blob.is_ok()) return blob.status();
  config_.sealed = std::move(blob).value();
  return share;
}

Result<SecretBuffer> combine_shares(const SecretBuffer& server_secret, const SecretBuffer& tpm_share) {
  auto out = SecretBuffer::allocate(server_secret.size() + tpm_share.size());
  if (!out.is_ok()) return out.status();
  memcpy(out->data(), server_secret.data(), server_secret.size());
  memcpy(out->data() + server_secret.size(), tpm_share.data(), tpm_share.size());
  return out;
}

Result<std::vector<uint32_t>> parse_pcr_list(const std::string& text) {
  std::vector<uint32_t> out;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    std::string item = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (item.empty() || item.size() > 2 || item.find_first_not_of("0123456789") != std::string::npos ||
        std::stoul(item) > tpm::kMaxPcrIndex) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("PCR list '", text, "': comma-separated indexes 0 to ", tpm::kMaxPcrIndex));
    }
    out.push_back(static_cast<uint32_t>(std::stoul(item)));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace keygate::unlocker
