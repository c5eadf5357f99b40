// libcryptsetup-token-keygate.so: a LUKS2 token plugin, so that
// `cryptsetup open --token-only` and systemd-cryptsetup open keygate volumes
// natively. libcryptsetup loads it for tokens of type "keygate", calls
// cryptsetup_token_open() for the keyslot passphrase, activates the keyslot
// itself, and frees the buffer through cryptsetup_token_buffer_free().
//
// Settings come from the environment (the plugin has no command line):
//   KEYGATE_METADATA_URL  metadata service (default http://169.254.169.254)
//   KEYGATE_PLATFORM      aws, gcp or azure (default: detected)
//   KEYGATE_TCTI          the TPM of TPM-bound volumes (default device:/dev/tpmrm0)
//   KEYGATE_DEADLINE      seconds to keep retrying unreachable servers
//                         (default 30; 0: one pass)
#include <libcryptsetup.h>
#include <openssl/crypto.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <future>
#include <string>

#include "core/json.h"
#include "core/log.h"
#include "unlocker/evidence.h"
#include "unlocker/tpm_attest.h"
#include "unlocker/failover.h"
#include "unlocker/luks.h"

using namespace keygate;
using namespace keygate::unlocker;

namespace {

std::string env_or(const char* name, const char* fallback) {
  const char* v = getenv(name);
  return v != nullptr && *v != '\0' ? v : fallback;
}

Result<KeygateToken> load_token(crypt_device* cd, int token) {
  const char* json = nullptr;
  int rc = crypt_token_json_get(cd, token, &json);
  if (rc < 0) return Status::error(ErrorKind::kNotFound, "token not readable");
  auto parsed = parse_json_object(json, 16 * 1024);
  if (!parsed.is_ok()) return parsed.status();
  return KeygateToken::from_json(parsed.value());
}

int errno_for(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kUnavailable: return -EAGAIN;  // try other tokens or the passphrase
    case ErrorKind::kRefused: return -EPERM;
    case ErrorKind::kInvalidArgument: return -EINVAL;
    default: return -EIO;
  }
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) const char* cryptsetup_token_version(void) {
  return "keygate 0.1.0";
}

__attribute__((visibility("default"))) int cryptsetup_token_open(crypt_device* cd, int token,
                                                                 char** buffer,
                                                                 size_t* buffer_len,
                                                                 void* /*usrptr*/) {
  log_init("keygate-token", LogSink::kStderr, LogLevel::kInfo);
  auto parsed = load_token(cd, token);
  if (!parsed.is_ok()) {
    log_error(parsed.status().message());
    return -EINVAL;
  }
  const std::string metadata_url = env_or("KEYGATE_METADATA_URL", kDefaultMetadataUrl);
  long deadline_s = strtol(env_or("KEYGATE_DEADLINE", "30").c_str(), nullptr, 10);
  RetryPolicy policy;
  policy.deadline_ms = deadline_s > 0 && deadline_s <= 3600 ? deadline_s * 1000 : 0;
  std::optional<Platform> platform;
  if (const char* p = getenv("KEYGATE_PLATFORM"); p != nullptr && *p != '\0') {
    auto parsed_platform = parse_platform(p);
    if (!parsed_platform.is_ok()) {
      log_error(parsed_platform.status().message());
      return -EINVAL;
    }
    platform = parsed_platform.value();
  }
  EvidenceCollector evidence(metadata_url, platform, 5000);
  evidence.start();
  std::unique_ptr<TpmAttester> tpm;
  if (parsed->tpm) {
    tpm = std::make_unique<TpmAttester>(env_or("KEYGATE_TCTI", tpm::kDefaultTcti), *parsed->tpm);
    tpm->start();
  }
  auto secret = fetch_volume_secret(parsed.value(), evidence, tpm.get(), policy);
  if (secret.is_ok() && tpm && !parsed->tpm->sealed.empty()) {
    auto share = tpm->unseal_share();
    if (!share.is_ok()) {
      log_error(share.status().message());
      return errno_for(share.status().kind());
    }
    auto both = combine_shares(secret.value(), share.value());
    if (!both.is_ok()) return -ENOMEM;
    secret = std::move(both).value();
  }
  if (!secret.is_ok()) {
    log_error(secret.status().message());
    return errno_for(secret.status().kind());
  }
  // Ownership passes to libcryptsetup, which returns it through
  // cryptsetup_token_buffer_free (wiped there).
  char* out = static_cast<char*>(malloc(secret->size()));
  if (out == nullptr) return -ENOMEM;
  (void)mlock(out, secret->size());
  memcpy(out, secret->data(), secret->size());
  *buffer = out;
  *buffer_len = secret->size();
  return 0;
}

__attribute__((visibility("default"))) void cryptsetup_token_buffer_free(void* buffer,
                                                                         size_t buffer_len) {
  if (buffer == nullptr) return;
  OPENSSL_cleanse(buffer, buffer_len);
  (void)munlock(buffer, buffer_len);
  free(buffer);
}

__attribute__((visibility("default"))) int cryptsetup_token_validate(crypt_device* /*cd*/,
                                                                     const char* json) {
  auto parsed = parse_json_object(json ? json : "", 16 * 1024);
  if (!parsed.is_ok()) return -EINVAL;
  return KeygateToken::from_json(parsed.value()).is_ok() ? 0 : -EINVAL;
}

__attribute__((visibility("default"))) void cryptsetup_token_dump(crypt_device* cd,
                                                                  const char* json) {
  auto parsed = parse_json_object(json ? json : "", 16 * 1024);
  if (!parsed.is_ok()) return;
  auto token = KeygateToken::from_json(parsed.value());
  if (!token.is_ok()) return;
  std::string text = str_cat("\tVolume:     ", token->volume_id, "\n\tCA sha256:  ",
                             token->ca_sha256, "\n");
  for (const auto& s : token->servers) text += str_cat("\tServer:     ", s, "\n");
  crypt_log(cd, CRYPT_LOG_NORMAL, text.c_str());
}

}  // extern "C"
