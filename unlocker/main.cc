// keygate: the instance-side unlocker. Runs in the initramfs (unlock,
// keyscript) and at enrollment time (enroll, encrypt, rotate), and reports a
// volume's keygate state (status). This file is the command table and the
// reading of each command's options; the work is in release.h (getting a
// volume's key) and enroll.h (registering one).
#include <curl/curl.h>
#include <openssl/crypto.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "core/args.h"
#include "core/encoding.h"
#include "core/file.h"
#include "core/json.h"
#include "core/log.h"
#include "core/protocol.h"
#include "unlocker/enroll.h"
#include "unlocker/luks.h"
#include "unlocker/memory.h"
#include "unlocker/release.h"
#include "tpm/tpm2_format.h"
#include "unlocker/tpm_attest.h"

using namespace keygate;
using namespace keygate::unlocker;

namespace {

constexpr char kUsage[] = R"(usage: keygate COMMAND DEVICE [options]

Commands:
  unlock DEVICE [NAME]   get the volume key from a key server and open DEVICE
                         as /dev/mapper/NAME (or only check it: --verify-only)
  enroll DEVICE          register DEVICE with a key server and add a keyslot
                         and a keygate token to it
  status DEVICE          show DEVICE's keygate token and keyslots
  rotate DEVICE          move DEVICE from its current key (an image's group
                         key) to a newly registered one of its own, with a
                         per-instance --enrollment-token-file (or by
                         attestation); --server/--ca default to the
                         volume's own
  keyscript DEVICE       write DEVICE's key to standard output (a pipe, never
                         a terminal), for crypttab's keyscript= option
  encrypt IMAGE          encrypt an unmounted image in place (LUKS2 offline
                         encryption, progress shown), then enroll it; for
                         image builders. Takes enroll's options (typically an
                         --image-group token and --no-evidence) and
                         --recovery-passphrase-file. A file image is grown by
                         16 MiB for the header; for a block device, shrink the
                         filesystem first and pass --reduce-device-size
                         16777216. Interrupted? Run it again: it resumes.

unlock options:
  --verify-only             check that the released key opens the keyslot,
                            without creating a mapping (no device-mapper needed)
  --metadata-url URL        metadata service (default http://169.254.169.254)
  --platform aws|gcp|azure  the cloud (default: detected by probing the
                            metadata service; AWS is tried first)
  --tcti SPEC               the TPM of a TPM-bound volume (default
                            device:/dev/tpmrm0, or $KEYGATE_TCTI)
  --timeout SECONDS         per-request timeout (default 5); connecting to a
                            server (TCP and TLS) is bounded to 1 s, so a dead
                            or silent server costs about a second
  --deadline SECONDS        keep retrying unreachable servers, with jittered
                            exponential backoff, for up to this long (default
                            0: one pass over the servers; the initramfs uses
                            120). A round in which every server refused ends
                            at once.
  The settings above (but --verify-only) may also come from the environment:
  KEYGATE_METADATA_URL, KEYGATE_PLATFORM, KEYGATE_TCTI, KEYGATE_TIMEOUT,
  KEYGATE_DEADLINE; an option given wins. The token plugin (cryptsetup open
  --token-only) reads the same variables, with the same defaults but a 30 s
  deadline (it runs unattended at boot).

enroll options:
  --server URL              key server, https:// (repeatable; tried in order)
  --token-server URL        the servers to record in the volume's token, in
                            unlock order (repeatable; default: the --server
                            list). For image builders whose build host reaches
                            the key servers at other addresses than instances
  --ca FILE                 PEM CA certificate of the key servers (pinned)
  --enrollment-token-file FILE
                            one-time enrollment token ("-" for stdin); without
                            one, the server enrolls by attestation if one of
                            its enroll_by_attestation rules admits the instance
                            (GCP and Azure only: on AWS a token is needed)
  --format                  DEVICE is blank: format it as LUKS2 first (refused
                            if DEVICE holds any filesystem or partition table)
  --recovery-passphrase-file FILE
                            with --format: also add a recovery passphrase
                            keyslot (argon2id, 32 MiB, 4 passes: opens in a
                            512 MiB instance)
  --no-recovery             with --format: no recovery keyslot (the key server
                            is then the only way in)
  --sector-size BYTES       with --format: 512 (default) or 4096
  --passphrase-file FILE    without --format: an existing passphrase of DEVICE
                            (passphrase files are read like cryptsetup's
                            --key-file: every byte, a trailing newline too)
  --no-evidence             enroll without instance evidence (image builders;
                            the token must describe an image-group volume)
  --description TEXT        shown in the server's volume list
  --tpm off|auto|required   bind the volume to this instance's TPM: every
                            unlock then carries a quote over --tpm-pcrs,
                            signed by the attestation key registered now
                            (default off; auto: only if a TPM is present)
  --tpm-pcrs LIST           PCRs to quote and bind (default 0,4,7)
  --tpm-bank NAME           PCR bank: sha256 (default), sha1, sha384, sha512
  --tpm-seal                two factors: part of the keyslot secret is sealed
                            in this TPM under the PCR values, so neither the
                            key server nor the TPM alone opens the volume
                            (implies --tpm required)
  --tpm-ak-handle HANDLE    use the provider's attestation key at this
                            persistent handle (0x81xxxxxx) instead of
                            keygate's own (an ECC P-256 key from a fixed
                            template under the endorsement hierarchy)
  --tcti SPEC               the TPM: device:/dev/tpmrm0 (default, or
                            $KEYGATE_TCTI), swtpm:host=H,port=P
  --deadline SECONDS        a confirm whose answer does not arrive (lost
                            connection, 429, 5xx) is asked again, with
                            backoff, for up to this long before the
                            enrollment is rolled back (default 30); after a
                            roll back the server is told to revoke the
                            volume it registered
  --metadata-url URL, --platform NAME, --timeout SECONDS   as for unlock

Common options:
  --help, --version         this text; the version, the kind of build and the
                            TLS and HTTP libraries
  --json                    status: print JSON
  --debug                   verbose logging, each line with the milliseconds
                            since start and each request with its timing
                            (never includes key material)
  --kmsg                    log to /dev/kmsg (initramfs console)

Exit status:
  0  unlocked / enrolled / ok
  1  internal error
  2  usage or bad configuration
  3  refused by the key server's policy
  4  no key server reachable (network, timeout, server error)
  5  a key server or its answer could not be trusted (TLS identity not the
     pinned CA, or a released key that failed authentication)
  6  volume error (not LUKS2, no keygate token, key does not open the keyslot)
)";

// One line of the command's result on standard output (stdio, not iostreams:
// the static build carries no iostreams).
void print_line(const std::string& line) {
  fwrite(line.data(), 1, line.size(), stdout);
  fputc('\n', stdout);
}

int fail(const Status& s) {
  log_error(s.message());
  return exit_code(outcome_for(s));
}

Status usage_error(std::string message) {
  return Status::error(ErrorKind::kInvalidArgument, std::move(message));
}

// Configuration files the operator names: unreadable is a usage error.
Result<std::string> read_config_file(const Args& args, const char* option, size_t max) {
  auto text = read_small_file(args.get(option), max);
  if (!text.is_ok()) return usage_error(str_cat("--", option, ": ", text.status().message()));
  return text;
}
Result<SecretBuffer> read_secret_option(const Args& args, const char* option, size_t max,
                                        bool trim_newline) {
  auto secret = read_secret_file(args.get(option), max, trim_newline);
  if (!secret.is_ok()) return usage_error(str_cat("--", option, ": ", secret.status().message()));
  return secret;
}
// --description, checked before any keyslot is made: the server keeps only
// UTF-8 text without control characters, of at most 256 bytes.
Result<std::string> description_option(const Args& args) {
  std::string text = args.get("description");
  if (text.size() > api::kMaxDescriptionLength) {
    return usage_error(str_cat("--description: longer than ", api::kMaxDescriptionLength, " bytes"));
  }
  if (!is_display_text(text)) {
    return usage_error("--description: not UTF-8 text, or holds a control character");
  }
  return text;
}
// The enrollment token: none means enrollment by attestation.
Result<SecretBuffer> enrollment_token(const Args& args) {
  if (!args.has("enrollment-token-file")) return SecretBuffer();
  return read_secret_option(args, "enrollment-token-file", 256, true);
}

Result<ReleaseSettings> release_settings(const Args& args) {
  return read_release_settings(EntryPoint::kCommand, [&args](const char* name) -> std::optional<std::string> {
    if (!args.has(name)) return std::nullopt;
    return args.get(name);
  });
}

int cmd_unlock(const Args& args) {
  prepare_heap_for_unlock();
  const auto& pos = args.positional();
  const bool verify_only = args.has("verify-only");
  if (pos.size() < 2 || pos.size() > 3) return fail(usage_error("usage: keygate unlock DEVICE [NAME]"));
  if (verify_only == (pos.size() == 3)) {
    return fail(usage_error(verify_only ? "unlock --verify-only takes no mapping NAME"
                                        : "unlock needs a mapping NAME, or --verify-only"));
  }
  const std::string& device = pos[1];
  const std::string name = verify_only ? "" : pos[2];
  auto settings = release_settings(args);
  if (!settings.is_ok()) return fail(settings.status());
  auto released = release_volume(device, settings.value(), name);
  if (!released.is_ok()) return fail(released.status());
  log_debug(str_cat(device, ": keyslot ", released->keyslot, " opened"));
  print_line(verify_only ? str_cat(device, ": key from server opens keyslot ", released->keyslot,
                                   " (verified, not activated)")
                         : str_cat(device, ": unlocked as /dev/mapper/", name));
  return exit_code(Outcome::kOk);
}

// crypttab keyscript mode: the key goes to standard output, which cryptsetup
// reads through a pipe. Never to a terminal.
int cmd_keyscript(const Args& args) {
  if (args.positional().size() != 2) return fail(usage_error("usage: keygate keyscript DEVICE"));
  if (isatty(STDOUT_FILENO)) {
    return fail(usage_error("keyscript writes the volume key to standard output; refusing to "
                            "write it to a terminal"));
  }
  prepare_heap_for_unlock();
  auto settings = release_settings(args);
  if (!settings.is_ok()) return fail(settings.status());
  // Checked against its keyslot before it is handed over, so a wrong key
  // falls back to the prompt.
  auto released = release_volume(args.positional()[1], settings.value());
  if (!released.is_ok()) return fail(released.status());
  const uint8_t* p = released->passphrase.data();
  size_t left = released->passphrase.size();
  while (left > 0) {
    ssize_t n = write(STDOUT_FILENO, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail(Status::error(ErrorKind::kIo, "keyscript: write failed"));
    p += n;
    left -= static_cast<size_t>(n);
  }
  return exit_code(Outcome::kOk);
}

int cmd_status(const Args& args) {
  if (args.positional().size() != 2) return fail(usage_error("usage: keygate status DEVICE"));
  auto dev = LuksDevice::open(args.positional()[1]);
  if (!dev.is_ok()) return fail(as_volume_failure(dev.status()));
  Json::Value out = dev->describe();
  auto found = dev->find_keygate_token();
  if (!found.is_ok()) return fail(as_volume_failure(found.status()));
  if (found->has_value()) {
    Json::Value t = found.value()->second.to_json();
    t.removeMember("ca");
    t["token_id"] = found.value()->first;
    out["keygate"] = t;
  }
  if (args.has("json")) {
    print_line(to_pretty_json(out));
    return exit_code(Outcome::kOk);
  }
  print_line(str_cat("device:   ", out["device"].asString()));
  print_line(str_cat("uuid:     ", out["uuid"].asString()));
  for (const auto& s : out["keyslots"]) {
    print_line(str_cat("keyslot ", s["keyslot"].asInt(), ": ", s.get("kdf", "?").asString()));
  }
  if (!out.isMember("keygate")) {
    print_line("keygate:  not enrolled");
    return exit_code(Outcome::kOk);
  }
  const Json::Value& t = out["keygate"];
  print_line(str_cat("keygate:  volume ", t["volume_id"].asString(), ", keyslot ",
                     t["keyslots"][0].asString(), ", CA sha256:", t["ca_sha256"].asString()));
  for (const auto& s : t["servers"]) print_line(str_cat("server:   ", s.asString()));
  return exit_code(Outcome::kOk);
}

// --tpm, --tpm-pcrs, --tpm-bank, --tpm-ak-handle, --tpm-seal.
Status read_tpm_options(const Args& args, EnrollRequest* r) {
  const std::string mode = args.get("tpm", "off");
  if (mode == "off") r->tpm_mode = TpmMode::kOff;
  else if (mode == "auto") r->tpm_mode = TpmMode::kAuto;
  else if (mode == "required") r->tpm_mode = TpmMode::kRequired;
  else return usage_error("--tpm must be off, auto or required");
  r->tpm_seal = args.has("tpm-seal");
  if (r->tpm_seal && r->tpm_mode == TpmMode::kOff && args.has("tpm")) {
    return usage_error("--tpm-seal needs the TPM: not with --tpm off");
  }
  r->tpm.bank = args.get("tpm-bank", "sha256");
  if (tpm::hash_alg_from_name(r->tpm.bank) == 0) {
    return usage_error("--tpm-bank must be sha1, sha256, sha384 or sha512");
  }
  auto pcrs = parse_pcr_list(args.get("tpm-pcrs", "0,4,7"));
  if (!pcrs.is_ok()) return pcrs.status().with_context("--tpm-pcrs");
  r->tpm.pcrs = pcrs.value();
  if (args.has("tpm-ak-handle")) {
    const std::string text = args.get("tpm-ak-handle");
    char* end = nullptr;
    errno = 0;
    const unsigned long handle = strtoul(text.c_str(), &end, 0);
    if (text.empty() || errno != 0 || *end != '\0' || handle > 0xffffffffUL || (handle >> 24) != 0x81) {
      return usage_error("--tpm-ak-handle must be a persistent handle 0x81xxxxxx");
    }
    r->tpm.ak_handle = static_cast<uint32_t>(handle);
  }
  return Status::ok();
}

// What enroll and encrypt share: servers, CA, token, evidence, TPM, settings.
Status read_enroll_options(const Args& args, const std::string& device, EnrollRequest* r) {
  r->device = device;
  if (!args.has("server")) return usage_error("needs at least one --server https://HOST:PORT");
  if (!args.has("ca")) return usage_error("needs --ca FILE (the key servers' CA certificate)");
  auto ca = read_config_file(args, "ca", 64 * 1024);
  if (!ca.is_ok()) return ca.status();
  auto servers = args.get_all("server");
  auto choice = choose_servers(servers, args.has("token-server") ? args.get_all("token-server") : servers,
                               ca.value());
  if (!choice.is_ok()) return choice.status();
  r->servers = std::move(choice).value();
  auto token = enrollment_token(args);
  if (!token.is_ok()) return token.status();
  r->enrollment_token = std::move(token).value();
  r->with_evidence = !args.has("no-evidence");
  if (r->enrollment_token.empty() && !r->with_evidence) {
    return usage_error("--no-evidence needs --enrollment-token-file (without evidence there is "
                       "nothing to enroll by attestation)");
  }
  auto description = description_option(args);
  if (!description.is_ok()) return description.status();
  r->description = std::move(description).value();
  auto settings = release_settings(args);
  if (!settings.is_ok()) return settings.status();
  r->settings = settings.value();
  return read_tpm_options(args, r);
}

int report_enrolled(const std::string& device, const Result<Enrolled>& e) {
  if (!e.is_ok()) return fail(e.status());
  print_line(str_cat(device, ": enrolled as volume ", e->volume_id, " (keyslot ", e->keyslot,
                     ", token ", e->token_id, ")"));
  return exit_code(Outcome::kOk);
}

int cmd_enroll(const Args& args) {
  if (args.positional().size() != 2) return fail(usage_error("usage: keygate enroll DEVICE ..."));
  const std::string device = args.positional()[1];
  EnrollRequest r;
  r.format = args.has("format");
  if (r.format && !args.has("recovery-passphrase-file") && !args.has("no-recovery")) {
    return fail(usage_error("--format needs --recovery-passphrase-file FILE, or --no-recovery"));
  }
  if (!r.format) {
    for (const char* only : {"recovery-passphrase-file", "no-recovery", "sector-size"}) {
      if (args.has(only)) return fail(usage_error(str_cat("--", only, " goes with --format")));
    }
    if (!args.has("passphrase-file")) {
      return fail(usage_error("enrolling an existing LUKS2 volume needs --passphrase-file (or --format)"));
    }
  } else if (args.has("passphrase-file")) {
    return fail(usage_error("--passphrase-file is for an existing volume, not with --format"));
  }
  auto sector = args.get_int("sector-size", 512, 512, 4096);
  if (!sector.is_ok() || (sector.value() != 512 && sector.value() != 4096)) {
    return fail(usage_error("--sector-size must be 512 or 4096"));
  }
  r.sector_size = static_cast<int>(sector.value());
  Status options = read_enroll_options(args, device, &r);
  if (!options.is_ok()) return fail(options);
  if (args.has("recovery-passphrase-file")) {
    auto recovery = read_secret_option(args, "recovery-passphrase-file", 512, false);
    if (!recovery.is_ok()) return fail(recovery.status());
    r.recovery = std::move(recovery).value();
  }
  if (!r.format) {
    auto existing = read_secret_option(args, "passphrase-file", 512, false);
    if (!existing.is_ok()) return fail(existing.status());
    r.existing = std::move(existing).value();
  }
  return report_enrolled(device, enroll_volume(r));
}

// Replaces DEVICE's keygate keyslot with one for a newly registered volume:
// an image's root volume moves from the image-group key every instance of
// the image shares to a key of its own.
int cmd_rotate(const Args& args) {
  if (args.positional().size() != 2) return fail(usage_error("usage: keygate rotate DEVICE ..."));
  RotateRequest r;
  r.device = args.positional()[1];
  if (args.has("server")) r.servers = args.get_all("server");
  if (args.has("token-server")) r.token_servers = args.get_all("token-server");
  if (args.has("ca")) {
    auto ca = read_config_file(args, "ca", 64 * 1024);
    if (!ca.is_ok()) return fail(ca.status());
    r.ca_pem = ca.value();
  }
  auto token = enrollment_token(args);
  if (!token.is_ok()) return fail(token.status());
  r.enrollment_token = std::move(token).value();
  auto description = description_option(args);
  if (!description.is_ok()) return fail(description.status());
  r.description = std::move(description).value();
  auto settings = release_settings(args);
  if (!settings.is_ok()) return fail(settings.status());
  r.settings = settings.value();
  auto rotated = rotate_volume(r);
  if (!rotated.is_ok()) return fail(rotated.status());
  print_line(str_cat(r.device, ": rotated from volume ", rotated->old_volume_id, " to volume ",
                     rotated->volume_id, " (keyslot ", rotated->keyslot, ")"));
  return exit_code(Outcome::kOk);
}

// Image builders: encrypts an unmounted image in place, then enrolls it with
// the recovery passphrase as the existing passphrase.
int cmd_encrypt(const Args& args) {
  if (args.positional().size() != 2) return fail(usage_error("usage: keygate encrypt IMAGE ..."));
  const std::string image = args.positional()[1];
  if (!args.has("recovery-passphrase-file")) {
    return fail(usage_error("encrypt needs --recovery-passphrase-file (the passphrase that opens "
                            "the image when no key server can)"));
  }
  // Enrollment's inputs are checked first: nothing is encrypted for a run
  // that could not enroll.
  EnrollRequest r;
  Status options = read_enroll_options(args, image, &r);
  if (!options.is_ok()) return fail(options.with_context("encrypt enrolls the image too"));
  auto recovery = read_secret_option(args, "recovery-passphrase-file", 512, false);
  if (!recovery.is_ok()) return fail(recovery.status());

  struct stat st;
  if (stat(image.c_str(), &st) != 0) return fail(usage_error(str_cat(image, ": ", strerror(errno))));
  const bool resuming = LuksDevice::open(image).is_ok();
  uint64_t reduce = 16u << 20;
  if (S_ISBLK(st.st_mode) && !args.has("reduce-device-size") && !resuming) {
    return fail(usage_error(str_cat(image, " is a block device: shrink its filesystem by 16 MiB and pass "
                                    "--reduce-device-size 16777216 to confirm the last 16 MiB are unused")));
  }
  if (args.has("reduce-device-size")) {
    auto size = args.get_int("reduce-device-size", 16 << 20, 2 << 20, 1L << 30);
    if (!size.is_ok()) return fail(size.status());
    reduce = static_cast<uint64_t>(size.value());
  }
  if (!resuming) {
    if (check_device_blank(image).is_ok()) {
      return fail(usage_error(str_cat(image, " holds no filesystem to encrypt; use keygate enroll --format")));
    }
    if (S_ISREG(st.st_mode) && !args.has("reduce-device-size")) {
      // Room for the header at the end, so no byte of the image is lost.
      if (truncate(image.c_str(), st.st_size + static_cast<off_t>(reduce)) != 0) {
        return fail(Status::error(ErrorKind::kIo, str_cat("grow ", image, ": ", strerror(errno))));
      }
      log_info(str_cat(image, ": grown by ", reduce >> 20, " MiB for the LUKS2 header"));
    }
  }
  int last_percent = -1;
  Status encrypted = encrypt_in_place(
      image, recovery.value(), reduce, [&](uint64_t done, uint64_t total) {
        int percent = total == 0 ? 100 : static_cast<int>(done * 100 / total);
        if (percent / 10 != last_percent / 10 || percent == 100) {
          fprintf(stderr, "keygate: encrypting %s: %d%% (%llu of %llu MiB)\n", image.c_str(),
                  percent, static_cast<unsigned long long>(done >> 20),
                  static_cast<unsigned long long>(total >> 20));
          last_percent = percent;
        }
      });
  if (!encrypted.is_ok()) {
    return fail(Status::error(ErrorKind::kIo, str_cat(encrypted.message(),
                                                      " (encryption stopped; run the same command "
                                                      "again to resume)")));
  }
  print_line(str_cat(image, ": encrypted in place (LUKS2); enrolling"));
  r.existing = std::move(recovery).value();
  return report_enrolled(image, enroll_volume(r));
}

// The options each command takes (beside the common ones); any other is an
// error that names it.
const std::set<std::string> kReleaseOptions = {"metadata-url", "platform", "tcti", "timeout", "deadline"};
const std::set<std::string> kEnrollOptions = {
    "metadata-url", "platform", "tcti", "timeout", "server", "token-server", "ca",
    "enrollment-token-file", "no-evidence", "description", "tpm", "tpm-pcrs", "tpm-bank",
    "tpm-ak-handle", "tpm-seal", "deadline"};

struct Command {
  const char* name;
  int (*run)(const Args&);
  std::set<std::string> options;
};

std::set<std::string> with(std::set<std::string> a, std::initializer_list<const char*> more) {
  for (const char* m : more) a.insert(m);
  return a;
}

const std::vector<Command>& commands() {
  static const std::vector<Command> table = {
      {"unlock", cmd_unlock, with(kReleaseOptions, {"verify-only"})},
      {"keyscript", cmd_keyscript, kReleaseOptions},
      {"status", cmd_status, {"json"}},
      {"enroll", cmd_enroll,
       with(kEnrollOptions, {"format", "recovery-passphrase-file", "no-recovery", "sector-size",
                             "passphrase-file"})},
      {"rotate", cmd_rotate,
       with(kReleaseOptions, {"server", "token-server", "ca", "enrollment-token-file", "description"})},
      {"encrypt", cmd_encrypt, with(kEnrollOptions, {"recovery-passphrase-file", "reduce-device-size"})},
  };
  return table;
}

const std::set<std::string> kCommonOptions = {"debug", "kmsg", "help", "version"};

}  // namespace

int main(int argc, char** argv) {
  disable_core_dumps();
  // keygate's TLS settings are its own (http_client.cc: TLS 1.2 or later,
  // security level 2, the pinned CA only), so they do not depend on whether
  // an initramfs carries openssl.cnf; and parsing it costs every boot ~0.5 ms.
  OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG, nullptr);
  std::vector<std::string> argv_list(argv + 1, argv + argc);
  auto args = Args::parse(
      argv_list,
      {"metadata-url", "platform", "tcti", "tpm", "tpm-pcrs", "tpm-bank", "tpm-ak-handle",
       "timeout", "deadline", "server", "token-server", "ca", "enrollment-token-file",
       "recovery-passphrase-file", "passphrase-file", "sector-size", "description",
       "reduce-device-size"},
      {"verify-only", "format", "no-recovery", "no-evidence", "tpm-seal", "json", "debug", "kmsg",
       "help", "version"});
  log_init("keygate", LogSink::kStderr, LogLevel::kInfo);
  // Without it the keys OpenSSL holds are in its normal heap (still wiped on
  // free, and core dumps are off): not a reason to stop a boot.
  if (Status heap = init_openssl_secure_heap(kSecureHeapClient); !heap.is_ok()) log_warning(heap.message());
  if (!args.is_ok()) {
    log_error(args.status().message());
    fputs(kUsage, stderr);
    return exit_code(Outcome::kConfig);
  }
  if (args->has("help")) {
    fputs(kUsage, stdout);
    return exit_code(Outcome::kOk);
  }
  if (args->has("version")) {
    // The build and the libraries it runs with: what a bug report needs.
    printf("keygate %s (%s)\n%s\n", KEYGATE_VERSION,
           KEYGATE_STATIC_BUILD ? "static release build" : "shared-library build", curl_version());
    return exit_code(Outcome::kOk);
  }
  log_init("keygate", args->has("kmsg") ? LogSink::kKmsg : LogSink::kStderr,
           args->has("debug") ? LogLevel::kDebug : LogLevel::kInfo);
  install_cryptsetup_logging(args->has("debug"));
  const auto& pos = args->positional();
  if (pos.empty()) {
    fputs(kUsage, stderr);
    return exit_code(Outcome::kConfig);
  }
  for (const Command& command : commands()) {
    if (pos[0] != command.name) continue;
    for (const auto& name : args->names()) {
      if (command.options.count(name) == 0 && kCommonOptions.count(name) == 0) {
        return fail(usage_error(str_cat(command.name, " does not take --", name)));
      }
    }
    return command.run(args.value());
  }
  log_error(str_cat("unknown command '", printable(pos[0], 64), "'"));
  fputs(kUsage, stderr);
  return exit_code(Outcome::kConfig);
}
