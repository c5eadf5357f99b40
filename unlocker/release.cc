#include "unlocker/release.h"

#include <cerrno>
#include <cstdlib>

#include "core/encoding.h"
#include "core/envelope.h"
#include "core/log.h"
#include "unlocker/failover.h"
#include "unlocker/http_client.h"
#include "unlocker/tpm_attest.h"

namespace keygate::unlocker {
namespace {

// A setting: the option's value, else the environment variable's, else none.
struct Setting {
  std::optional<std::string> value;
  std::string source;  // "--timeout" or "KEYGATE_TIMEOUT", for errors
};

Setting lookup(const OptionLookup& option, const char* name, const char* variable) {
  if (auto v = option(name)) return {v, str_cat("--", name)};
  const char* env = getenv(variable);
  if (env != nullptr && *env != '\0') return {std::string(env), variable};
  return {std::nullopt, ""};
}

Result<long> seconds(const Setting& s, long fallback, long min, long max) {
  if (!s.value) return fallback;
  const std::string& text = *s.value;
  char* end = nullptr;
  errno = 0;
  const long v = text.empty() ? 0 : strtol(text.c_str(), &end, 10);
  if (text.empty() || errno != 0 || end == nullptr || *end != '\0' || v < min || v > max) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat(s.source, " '", printable(text, 32), "': a whole number of seconds from ",
                                 min, " to ", max));
  }
  return v;
}

// Opens one envelope made for a throwaway key, so OpenSSL's first-use setup
// of X25519, HKDF and AES-GCM is done before the server's answer arrives
// (about 0.5 ms less between the answer and the keyslot check). The result
// is discarded; a failure here shows again, and is reported, on the real one.
void warm_up_envelope() {
  auto client = X25519KeyPair::generate();
  auto secret = SecretBuffer::random(32);
  if (!client.is_ok() || !secret.is_ok()) return;
  const Bytes nonce(32, 0);
  const Bytes client_public(client->public_key.begin(), client->public_key.end());
  auto wrapped = wrap_secret_for_client(secret.value(), client_public, "warm-up", nonce);
  if (wrapped.is_ok()) (void)unwrap_secret(wrapped.value(), client.value(), "warm-up", nonce);
}

}  // namespace

Status as_volume_failure(const Status& s) {
  switch (s.kind()) {
    case ErrorKind::kNotFound:
    case ErrorKind::kConflict:
    case ErrorKind::kIo:
    case ErrorKind::kUntrusted: return s;
    default: return Status::error(ErrorKind::kIo, s.message());
  }
}

Outcome outcome_for(const Status& s) {
  switch (s.kind()) {
    case ErrorKind::kOk: return Outcome::kOk;
    case ErrorKind::kInvalidArgument: return Outcome::kConfig;
    case ErrorKind::kRefused: return Outcome::kRefused;
    case ErrorKind::kUnavailable: return Outcome::kUnreachable;
    case ErrorKind::kUntrusted:
    case ErrorKind::kIntegrity: return Outcome::kUntrusted;
    case ErrorKind::kNotFound:
    case ErrorKind::kConflict:
    case ErrorKind::kIo: return Outcome::kVolume;
    case ErrorKind::kInternal: return Outcome::kInternal;
  }
  return Outcome::kInternal;
}

const char* outcome_name(Outcome o) {
  switch (o) {
    case Outcome::kOk: return "ok";
    case Outcome::kInternal: return "internal error";
    case Outcome::kConfig: return "bad configuration";
    case Outcome::kRefused: return "refused";
    case Outcome::kUnreachable: return "unreachable";
    case Outcome::kUntrusted: return "untrusted";
    case Outcome::kVolume: return "volume error";
  }
  return "internal error";
}

Result<ReleaseSettings> read_release_settings(EntryPoint entry, const OptionLookup& option) {
  ReleaseSettings s;
  if (auto url = lookup(option, "metadata-url", "KEYGATE_METADATA_URL"); url.value) {
    if (url.value->rfind("http://", 0) != 0 || url.value->size() > 256) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat(url.source, " '", printable(*url.value, 64),
                                   "': the metadata service is an http:// URL"));
    }
    s.metadata_url = *url.value;
  }
  if (auto p = lookup(option, "platform", "KEYGATE_PLATFORM"); p.value) {
    auto platform = parse_platform(*p.value);
    if (!platform.is_ok()) return platform.status().with_context(p.source);
    s.platform = platform.value();
  }
  s.tcti = lookup(option, "tcti", "KEYGATE_TCTI").value.value_or(tpm::kDefaultTcti);
  auto timeout = seconds(lookup(option, "timeout", "KEYGATE_TIMEOUT"),
                         ReleaseSettings::kDefaultTimeoutSeconds, 1,
                         ReleaseSettings::kMaxTimeoutSeconds);
  if (!timeout.is_ok()) return timeout.status();
  auto deadline = seconds(lookup(option, "deadline", "KEYGATE_DEADLINE"),
                          entry == EntryPoint::kTokenPlugin
                              ? ReleaseSettings::kPluginDefaultDeadlineSeconds
                              : ReleaseSettings::kDefaultDeadlineSeconds,
                          0,
                          ReleaseSettings::kMaxDeadlineSeconds);
  if (!deadline.is_ok()) return deadline.status();
  s.request_timeout_ms = timeout.value() * 1000;
  s.deadline_ms = deadline.value() * 1000;
  return s;
}

Release::Release(const ReleaseSettings& settings)
    : settings_(settings),
      evidence_(std::make_unique<EvidenceCollector>(settings.metadata_url, settings.platform,
                                                    settings.request_timeout_ms)) {
  evidence_->start();
  // OpenSSL's one-time setup for the TLS client and the envelope, off the
  // critical path (2 to 3 ms on a small instance).
  https_ready_ = std::async(std::launch::async, [] {
    prepare_https();
    warm_up_envelope();
  });
}

Release::~Release() {
  if (https_ready_.valid()) https_ready_.wait();
}

Result<SecretBuffer> Release::passphrase_for(const KeygateToken& token) {
  log_debug(str_cat("volume ", token.volume_id, ", keyslot ", token.keyslot));
  std::unique_ptr<TpmAttester> tpm;
  if (token.tpm) {
    // The attestation key is made while the server is asked for a nonce.
    tpm = std::make_unique<TpmAttester>(settings_.tcti, *token.tpm);
    tpm->start();
  }
  RetryPolicy policy;
  policy.deadline_ms = settings_.deadline_ms;
  policy.request_timeout_ms = settings_.request_timeout_ms;
  auto secret = fetch_volume_secret(token, *evidence_, tpm.get(), policy);
  if (!secret.is_ok()) return secret.status();
  if (!tpm || token.tpm->sealed.empty()) return secret;
  // Two-factor: the keyslot opens with the server's secret and the TPM's share.
  auto share = tpm->unseal_share();
  if (!share.is_ok()) return share.status();
  return combine_shares(secret.value(), share.value());
}

namespace {

// The device opened, and its keygate tokens as they are now (in id order).
struct DeviceTokens {
  LuksDevice device;
  std::vector<std::pair<int, KeygateToken>> tokens;
};

Result<DeviceTokens> read_tokens(const std::string& device) {
  auto dev = LuksDevice::open(device);
  if (!dev.is_ok()) return as_volume_failure(dev.status());
  auto tokens = dev->keygate_tokens();
  if (!tokens.is_ok()) return as_volume_failure(tokens.status());
  if (tokens->empty()) return Status::error(ErrorKind::kNotFound, str_cat(device, ": no keygate token"));
  return DeviceTokens{std::move(dev).value(), std::move(tokens).value()};
}

bool same_tokens(const DeviceTokens& a, const DeviceTokens& b) {
  if (a.tokens.size() != b.tokens.size()) return false;
  for (size_t i = 0; i < a.tokens.size(); ++i) {
    const auto& [id_a, ta] = a.tokens[i];
    const auto& [id_b, tb] = b.tokens[i];
    if (id_a != id_b || ta.volume_id != tb.volume_id || ta.keyslot != tb.keyslot) return false;
  }
  return true;
}

}  // namespace

// While `keygate rotate` moves a device to a new volume, the header holds two
// keygate tokens for a moment (the new one, pending on the server until
// confirmed, beside the old), and may change between being read and the
// keyslot being opened (the old keyslot destroyed, its number perhaps given
// to the next rotation's). So every token is tried in id order, a refusal or
// a key that misses moving on to the next; and when none opens, a header
// that has changed since it was read is read again.
Result<ReleasedVolume> release_volume(const std::string& device, const ReleaseSettings& settings,
                                      const std::string& activate_as) {
  Release release(settings);  // detection overlaps reading the header
  auto current = read_tokens(device);
  if (!current.is_ok()) return current.status();
  for (int reread = 0;; ++reread) {
    Status first_failure;
    for (auto& [token_id, token] : current->tokens) {
      Status failed;
      auto passphrase = release.passphrase_for(token);
      if (passphrase.is_ok()) {
        auto slot = current->device.activate(activate_as, token.keyslot, passphrase.value());
        if (slot.is_ok()) {
          return ReleasedVolume{std::move(current->device), token_id, std::move(token),
                                std::move(passphrase).value(), slot.value()};
        }
        // Only a key that misses its keyslot may be the header's moving
        // under it; anything else about the device is final.
        if (slot.status().kind() != ErrorKind::kRefused) return as_volume_failure(slot.status());
        failed = as_volume_failure(slot.status());
      } else {
        // Unreachable servers or a broken TPM are the same for every token.
        if (passphrase.status().kind() != ErrorKind::kRefused) return passphrase.status();
        failed = passphrase.status();
      }
      if (first_failure.is_ok()) first_failure = failed;
    }
    if (reread == kMaxHeaderRereads) return first_failure;
    auto now = read_tokens(device);
    if (!now.is_ok()) return now.status();
    if (same_tokens(now.value(), current.value())) return first_failure;
    log_info(str_cat(device, ": its keygate token changed while it was being opened; asking again"));
    current = std::move(now);
  }
}

}  // namespace keygate::unlocker
