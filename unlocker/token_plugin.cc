// libcryptsetup-token-keygate.so: a LUKS2 token plugin, so that
// `cryptsetup open --token-only` and systemd-cryptsetup open keygate volumes
// natively. libcryptsetup loads it for tokens of type "keygate", calls
// cryptsetup_token_open() for the keyslot passphrase, activates the keyslot
// itself, and frees the buffer through cryptsetup_token_buffer_free().
//
// Settings come from the environment (the plugin has no command line), the
// same variables and defaults as the keygate command's (release.h):
// KEYGATE_METADATA_URL, KEYGATE_PLATFORM, KEYGATE_TCTI, KEYGATE_TIMEOUT,
// KEYGATE_DEADLINE (seconds to keep retrying unreachable servers; default
// 30: the plugin runs unattended at boot, where the command's default of
// one pass would give up before the network is ready).
#include <libcryptsetup.h>
#include <openssl/crypto.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include "core/log.h"
#include "unlocker/release.h"
#include "unlocker/token.h"

using namespace keygate;
using namespace keygate::unlocker;

namespace {

Result<KeygateToken> load_token(crypt_device* cd, int token) {
  const char* json = nullptr;
  if (crypt_token_json_get(cd, token, &json) < 0 || json == nullptr) {
    return Status::error(ErrorKind::kNotFound, "token not readable");
  }
  return KeygateToken::parse(json);
}

// libcryptsetup's reading of a failure: -EAGAIN lets it try other tokens or
// the passphrase; -EPERM is a refusal; -EINVAL bad configuration.
int errno_for(Outcome outcome) {
  switch (outcome) {
    case Outcome::kUnreachable: return -EAGAIN;
    case Outcome::kRefused: return -EPERM;
    case Outcome::kConfig: return -EINVAL;
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
  auto settings = read_release_settings(EntryPoint::kTokenPlugin,
                                        [](const char*) { return std::optional<std::string>(); });
  if (!settings.is_ok()) {
    log_error(str_cat(settings.status().message(), " (bad configuration, keygate's exit status ",
                      exit_code(Outcome::kConfig), ")"));
    return -EINVAL;
  }
  Release release(settings.value());
  auto secret = release.passphrase_for(parsed.value());
  if (!secret.is_ok()) {
    const Outcome outcome = outcome_for(secret.status());
    log_error(str_cat(secret.status().message(), " (", outcome_name(outcome),
                      ", keygate's exit status ", exit_code(outcome), ")"));
    return errno_for(outcome);
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
  return KeygateToken::parse(json ? json : "").is_ok() ? 0 : -EINVAL;
}

__attribute__((visibility("default"))) void cryptsetup_token_dump(crypt_device* cd,
                                                                  const char* json) {
  auto token = KeygateToken::parse(json ? json : "");
  if (!token.is_ok()) return;
  std::string text = str_cat("\tVolume:     ", token->volume_id, "\n\tCA sha256:  ",
                             token->ca_sha256, "\n");
  for (const auto& s : token->servers) text += str_cat("\tServer:     ", s, "\n");
  crypt_log(cd, CRYPT_LOG_NORMAL, text.c_str());
}

}  // extern "C"
