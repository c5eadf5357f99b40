// keygate: the instance-side unlocker. Runs in the initramfs (unlock) and at
// enrollment time (enroll), and reports a volume's keygate state (status).
#include <curl/curl.h>
#include <openssl/crypto.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <cstdio>
#include <optional>
#include <future>
#include <string>
#include <vector>

#include "core/args.h"
#include "core/crypto.h"
#include "core/envelope.h"
#include "core/file.h"
#include "core/json.h"
#include "core/log.h"
#include "core/protocol.h"
#include "unlocker/evidence.h"
#include "unlocker/failover.h"
#include "unlocker/http_client.h"
#include "unlocker/luks.h"
#include "unlocker/memory.h"
#include "unlocker/server_client.h"
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

enum ExitCode {
  kExitOk = 0,
  kExitInternal = 1,
  kExitUsage = 2,
  kExitRefused = 3,
  kExitUnreachable = 4,
  kExitUntrusted = 5,
  kExitVolume = 6,
};

int exit_code_for(const Status& s) {
  switch (s.kind()) {
    case ErrorKind::kOk: return kExitOk;
    case ErrorKind::kInvalidArgument: return kExitUsage;
    case ErrorKind::kRefused: return kExitRefused;
    case ErrorKind::kUnavailable: return kExitUnreachable;
    case ErrorKind::kUntrusted:
    case ErrorKind::kIntegrity: return kExitUntrusted;
    case ErrorKind::kNotFound:
    case ErrorKind::kConflict:
    case ErrorKind::kIo: return kExitVolume;
    case ErrorKind::kInternal: return kExitInternal;
  }
  return kExitInternal;
}

// One line of the command's result on standard output (stdio, not iostreams:
// the static build carries no iostreams).
void print_line(const std::string& line) {
  fwrite(line.data(), 1, line.size(), stdout);
  fputc('\n', stdout);
}

int fail(const Status& s, int code) {
  log_error(s.message());
  return code;
}
int fail(const Status& s) { return fail(s, exit_code_for(s)); }

long timeout_ms(const Args& args) {
  auto t = args.get_int("timeout", 5, 1, 600);
  return t.is_ok() ? t.value() * 1000 : 5000;
}

// The evidence source for --metadata-url and --platform.
Result<std::unique_ptr<EvidenceCollector>> evidence_collector(const Args& args) {
  std::optional<Platform> platform;
  if (args.has("platform")) {
    auto p = parse_platform(args.get("platform"));
    if (!p.is_ok()) return p.status();
    platform = p.value();
  }
  return std::make_unique<EvidenceCollector>(args.get("metadata-url", kDefaultMetadataUrl), platform,
                                             timeout_ms(args));
}

// The TPM interface: --tcti, else $KEYGATE_TCTI, else the kernel's resource manager.
std::string tcti(const Args& args) {
  const char* env = getenv("KEYGATE_TCTI");
  return args.get("tcti", env != nullptr && *env != '\0' ? env : tpm::kDefaultTcti);
}

// Reads DEVICE's keygate token and gets its secret from the key servers.
// On failure, `exit_code` says why.
struct Released {
  std::optional<LuksDevice> device;
  KeygateToken token;
  SecretBuffer secret;
};

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

Result<Released> release_secret(const Args& args, const std::string& device, int* exit_code) {
  // Detect the platform (and fetch AWS's document, which does not depend
  // on the challenge) while the header is read.
  auto evidence = evidence_collector(args);
  if (!evidence.is_ok()) {
    *exit_code = kExitUsage;
    return evidence.status();
  }
  evidence.value()->start();
  // And OpenSSL's one-time setup for the TLS client and the envelope, off
  // the critical path (2 to 3 ms on a small instance). Joined on return.
  auto https_ready = std::async(std::launch::async, [] {
    prepare_https();
    warm_up_envelope();
  });
  auto deadline = args.get_int("deadline", 0, 0, 3600);
  if (!deadline.is_ok()) {
    *exit_code = kExitUsage;
    return deadline.status();
  }
  auto dev = LuksDevice::open(device);
  if (!dev.is_ok()) {
    *exit_code = kExitVolume;
    return dev.status();
  }
  auto found = dev->find_keygate_token();
  if (!found.is_ok()) {
    *exit_code =
        found.status().kind() == ErrorKind::kUntrusted ? kExitUntrusted : kExitVolume;
    return found.status();
  }
  if (!found->has_value()) {
    *exit_code = kExitVolume;
    return Status::error(ErrorKind::kNotFound, str_cat(device, ": no keygate token"));
  }
  Released out;
  out.token = std::move(found.value()->second);
  log_debug(str_cat(device, ": keygate token for volume ", out.token.volume_id, ", keyslot ",
                    out.token.keyslot));
  std::unique_ptr<TpmAttester> tpm;
  if (out.token.tpm) {
    // The attestation key is made while the server is asked for a nonce.
    tpm = std::make_unique<TpmAttester>(tcti(args), *out.token.tpm);
    tpm->start();
  }
  RetryPolicy policy;
  policy.deadline_ms = deadline.value() * 1000;
  policy.request_timeout_ms = timeout_ms(args);
  auto secret = fetch_volume_secret(out.token, *evidence.value(), tpm.get(), policy);
  if (!secret.is_ok()) {
    *exit_code = exit_code_for(secret.status());
    return secret.status();
  }
  out.secret = std::move(secret).value();
  if (tpm && !out.token.tpm->sealed.empty()) {
    // Two-factor: the keyslot opens with the server's secret and the TPM's share.
    auto share = tpm->unseal_share();
    if (!share.is_ok()) {
      *exit_code = exit_code_for(share.status());
      return share.status();
    }
    auto both = combine_shares(out.secret, share.value());
    if (!both.is_ok()) return both.status();
    out.secret = std::move(both).value();
  }
  out.device = std::move(dev).value();
  return out;
}

int cmd_unlock(const Args& args) {
  prepare_heap_for_unlock();
  const auto& pos = args.positional();
  if (pos.size() < 2 || pos.size() > 3) {
    return fail(Status::error(ErrorKind::kInvalidArgument, "usage: keygate unlock DEVICE [NAME]"),
                kExitUsage);
  }
  const std::string device = pos[1];
  const bool verify_only = args.has("verify-only");
  std::string name = pos.size() == 3 ? pos[2] : "";
  if (!verify_only && name.empty()) {
    return fail(Status::error(ErrorKind::kInvalidArgument,
                              "unlock needs a mapping NAME, or --verify-only"),
                kExitUsage);
  }
  if (verify_only) name.clear();
  int code = kExitInternal;
  auto released = release_secret(args, device, &code);
  if (!released.is_ok()) return fail(released.status(), code);
  auto slot = released->device->activate(name, released->token.keyslot, released->secret);
  if (!slot.is_ok()) return fail(slot.status(), kExitVolume);
  log_debug(str_cat(device, ": keyslot ", slot.value(), " opened"));
  if (verify_only) {
    print_line(str_cat(device, ": key from server opens keyslot ", slot.value(),
                       " (verified, not activated)"));
  } else {
    print_line(str_cat(device, ": unlocked as /dev/mapper/", name));
  }
  return kExitOk;
}

// crypttab keyscript mode: the key goes to standard output, which cryptsetup
// reads through a pipe. Never to a terminal.
int cmd_keyscript(const Args& args) {
  if (args.positional().size() != 2) {
    return fail(Status::error(ErrorKind::kInvalidArgument, "usage: keygate keyscript DEVICE"),
                kExitUsage);
  }
  if (isatty(STDOUT_FILENO)) {
    return fail(Status::error(ErrorKind::kInvalidArgument,
                              "keyscript writes the volume key to standard output; refusing to "
                              "write it to a terminal"),
                kExitUsage);
  }
  prepare_heap_for_unlock();
  int code = kExitInternal;
  auto released = release_secret(args, args.positional()[1], &code);
  if (!released.is_ok()) return fail(released.status(), code);
  // Check before handing it over, so a wrong key falls back to the prompt.
  auto slot = released->device->activate("", released->token.keyslot, released->secret);
  if (!slot.is_ok()) return fail(slot.status(), kExitVolume);
  const uint8_t* p = released->secret.data();
  size_t left = released->secret.size();
  while (left > 0) {
    ssize_t n = write(STDOUT_FILENO, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail(Status::error(ErrorKind::kIo, "keyscript: write failed"), kExitVolume);
    p += n;
    left -= static_cast<size_t>(n);
  }
  return kExitOk;
}

int cmd_status(const Args& args) {
  if (args.positional().size() != 2) {
    return fail(Status::error(ErrorKind::kInvalidArgument, "usage: keygate status DEVICE"),
                kExitUsage);
  }
  auto dev = LuksDevice::open(args.positional()[1]);
  if (!dev.is_ok()) return fail(dev.status(), kExitVolume);
  Json::Value out = dev->describe();
  auto found = dev->find_keygate_token();
  if (!found.is_ok()) return fail(found.status(), kExitVolume);
  if (found->has_value()) {
    Json::Value t = found.value()->second.to_json();
    t.removeMember("ca");
    t["token_id"] = found.value()->first;
    out["keygate"] = t;
  }
  if (args.has("json")) {
    print_line(to_pretty_json(out));
  } else {
    print_line(str_cat("device:   ", out["device"].asString()));
    print_line(str_cat("uuid:     ", out["uuid"].asString()));
    for (const auto& s : out["keyslots"]) {
      print_line(str_cat("keyslot ", s["keyslot"].asInt(), ": ", s.get("kdf", "?").asString()));
    }
    if (out.isMember("keygate")) {
      const Json::Value& t = out["keygate"];
      print_line(str_cat("keygate:  volume ", t["volume_id"].asString(), ", keyslot ",
                         t["keyslots"][0].asString(), ", CA sha256:", t["ca_sha256"].asString()));
      for (const auto& s : t["servers"]) print_line(str_cat("server:   ", s.asString()));
    } else {
      print_line("keygate:  not enrolled");
    }
  }
  return kExitOk;
}

// Undoes a partial enrollment so the device is as it was.
void roll_back(LuksDevice& dev, bool formatted, int keyslot, int token_id) {
  if (formatted) {
    Status s = dev.erase_header();
    if (!s.is_ok()) log_error(str_cat("rollback: ", s.message()));
    else log_warning(str_cat(dev.path(), ": rolled back: LUKS header erased, device blank again"));
    return;
  }
  if (token_id >= 0) {
    Status s = dev.remove_token(token_id);
    if (!s.is_ok()) log_error(str_cat("rollback: ", s.message()));
  }
  if (keyslot >= 0) {
    Status s = dev.destroy_keyslot(keyslot);
    if (!s.is_ok()) log_error(str_cat("rollback: ", s.message()));
  }
  log_warning(str_cat(dev.path(), ": rolled back: keygate keyslot and token removed"));
}

// Phase 1 of an enrollment: registers with the first server that answers.
// A refusal or a bad request ends it (the next server would answer the same).
Result<Enrollment> register_with_first_server(const std::vector<std::string>& servers,
                                              const std::string& ca, const Args& args,
                                              const SecretBuffer& token, EvidenceCollector* evidence,
                                              TpmAttester* tpm, const std::string& description,
                                              std::string* used_server) {
  Status last = Status::error(ErrorKind::kInvalidArgument, "no key server given");
  for (const auto& url : servers) {
    auto r = register_volume(ServerEndpoint{url, ca, timeout_ms(args)}, token, evidence, tpm,
                             description);
    if (r.is_ok()) {
      *used_server = url;
      log_info(str_cat("registered volume ", r->volume_id, " with ", url));
      return r;
    }
    last = r.status();
    log_warning(last.message());
    if (last.kind() != ErrorKind::kUnavailable && last.kind() != ErrorKind::kUntrusted) break;
  }
  return last;
}

int cmd_enroll(const Args& args) {
  if (args.positional().size() != 2) {
    return fail(Status::error(ErrorKind::kInvalidArgument, "usage: keygate enroll DEVICE ..."),
                kExitUsage);
  }
  const std::string device = args.positional()[1];
  const bool format = args.has("format");
  auto servers = args.get_all("server");
  auto usage = [](const std::string& m) {
    return fail(Status::error(ErrorKind::kInvalidArgument, m), kExitUsage);
  };
  if (servers.empty()) return usage("enroll needs at least one --server https://HOST:PORT");
  if (servers.size() > 8) return usage("at most 8 --server");
  auto token_servers = args.has("token-server") ? args.get_all("token-server") : servers;
  if (token_servers.size() > 8) return usage("at most 8 --token-server");
  for (const auto& list : {servers, token_servers}) {
    for (const auto& s : list) {
      if (s.rfind("https://", 0) != 0) return usage(str_cat("server ", s, ": must be https://"));
    }
  }
  if (!args.has("ca")) return usage("enroll needs --ca FILE (the key servers' CA certificate)");
  if (!args.has("enrollment-token-file") && args.has("no-evidence")) {
    return usage("enroll needs --enrollment-token-file, or instance evidence (enrollment by "
                 "attestation, where the server's rules allow it)");
  }
  if (format && !args.has("recovery-passphrase-file") && !args.has("no-recovery")) {
    return usage("--format needs --recovery-passphrase-file FILE, or --no-recovery");
  }
  if (!format && !args.has("passphrase-file")) {
    return usage("enrolling an existing LUKS2 volume needs --passphrase-file (or --format)");
  }
  auto sector = args.get_int("sector-size", 512, 512, 4096);
  if (!sector.is_ok() || (sector.value() != 512 && sector.value() != 4096)) {
    return usage("--sector-size must be 512 or 4096");
  }

  // Read every input and check the device before anything is changed.
  auto ca_pem = read_small_file(args.get("ca"), 64 * 1024);
  if (!ca_pem.is_ok()) return fail(ca_pem.status(), kExitUsage);
  const std::string& ca = ca_pem.value();
  auto fingerprint = certificate_sha256_fingerprint(ca);
  if (!fingerprint.is_ok()) return fail(fingerprint.status().with_context(args.get("ca")), kExitUsage);
  // No token file: enrollment by attestation (an empty token).
  auto token = args.has("enrollment-token-file")
                   ? read_secret_file(args.get("enrollment-token-file"), 256, true)
                   : Result<SecretBuffer>(SecretBuffer());
  if (!token.is_ok()) return fail(token.status(), kExitUsage);
  std::optional<SecretBuffer> recovery, existing;
  if (args.has("recovery-passphrase-file")) {
    auto r = read_secret_file(args.get("recovery-passphrase-file"), 512, false);
    if (!r.is_ok()) return fail(r.status(), kExitUsage);
    recovery = std::move(r).value();
  }
  if (!format) {
    auto p = read_secret_file(args.get("passphrase-file"), 512, false);
    if (!p.is_ok()) return fail(p.status(), kExitUsage);
    existing = std::move(p).value();
  }
  std::optional<LuksDevice> dev;
  if (format) {
    Status blank = check_device_blank(device);
    if (!blank.is_ok()) return fail(blank, kExitVolume);
  } else {
    auto opened = LuksDevice::open(device);
    if (!opened.is_ok()) return fail(opened.status(), kExitVolume);
    dev = std::move(opened).value();
    auto found = dev->find_keygate_token();
    if (!found.is_ok()) return fail(found.status(), kExitVolume);
    if (found->has_value()) {
      return fail(Status::error(ErrorKind::kConflict,
                                str_cat(device, " is already enrolled (volume ",
                                        found.value()->second.volume_id, ")")),
                  kExitVolume);
    }
    auto ok = dev->activate("", -1, *existing);
    if (!ok.is_ok()) {
      return fail(Status::error(ErrorKind::kRefused,
                                str_cat(device, ": the --passphrase-file passphrase opens no keyslot")),
                  kExitVolume);
    }
  }

  std::unique_ptr<EvidenceCollector> evidence;
  if (!args.has("no-evidence")) {
    auto e = evidence_collector(args);
    if (!e.is_ok()) return fail(e.status(), kExitUsage);
    evidence = std::move(e).value();
    auto platform = evidence->platform();
    if (!platform.is_ok()) return fail(platform.status(), kExitUnreachable);
    log_info(str_cat("platform: ", platform_name(platform.value())));
  }
  // The TPM: --tpm off (default), auto (use one if present), required;
  // --tpm-seal adds the second factor and implies required.
  const std::string tpm_mode = args.has("tpm-seal") ? "required" : args.get("tpm", "off");
  if (tpm_mode != "off" && tpm_mode != "auto" && tpm_mode != "required") {
    return usage("--tpm must be off, auto or required");
  }
  std::unique_ptr<TpmAttester> tpm;
  std::optional<SecretBuffer> tpm_share;
  if (tpm_mode != "off") {
    TokenTpm config;
    config.bank = args.get("tpm-bank", "sha256");
    auto pcrs = parse_pcr_list(args.get("tpm-pcrs", "0,4,7"));
    if (!pcrs.is_ok()) return fail(pcrs.status(), kExitUsage);
    config.pcrs = pcrs.value();
    if (args.has("tpm-ak-handle")) {
      config.ak_handle = static_cast<uint32_t>(strtoul(args.get("tpm-ak-handle").c_str(), nullptr, 0));
      if ((config.ak_handle >> 24) != 0x81) return usage("--tpm-ak-handle must be a persistent handle 0x81xxxxxx");
    }
    if (config.bank != "sha1" && config.bank != "sha256" && config.bank != "sha384" && config.bank != "sha512") {
      return usage("--tpm-bank must be sha1, sha256, sha384 or sha512");
    }
    tpm = std::make_unique<TpmAttester>(tcti(args), config);
    Status ready = tpm->ready();
    if (!ready.is_ok()) {
      if (tpm_mode == "required") return fail(ready, kExitVolume);
      log_info(str_cat("no TPM used (--tpm auto): ", ready.message()));
      tpm.reset();
    } else if (args.has("tpm-seal")) {
      auto share = tpm->seal_new_share();
      if (!share.is_ok()) return fail(share.status().with_context("seal the TPM share"), kExitVolume);
      tpm_share = std::move(share).value();
    }
    if (tpm) log_info(str_cat("TPM: quotes over ", config.bank, " PCRs ", args.get("tpm-pcrs", "0,4,7"),
                               tpm_share ? ", second factor sealed" : ""));
  }
  // Phase 1: register with the first server that answers.
  std::string used_server;
  auto registered = register_with_first_server(servers, ca, args, token.value(), evidence.get(),
                                               tpm.get(), args.get("description"), &used_server);
  if (!registered.is_ok()) return fail(registered.status());
  std::optional<Enrollment> enrollment = std::move(registered).value();

  // Phase 2: keyslot and token on the device, checked, then confirmed.
  int keyslot = -1, token_id = -1;
  if (format) {
    auto formatted = LuksDevice::format(device, static_cast<int>(sector.value()));
    if (!formatted.is_ok()) return fail(formatted.status(), kExitVolume);
    dev = std::move(formatted).value();
  }
  auto finish = [&]() -> Status {
    // The keyslot's passphrase: the server's secret, or with a TPM share
    // the two together.
    std::optional<SecretBuffer> combined;
    if (tpm_share) {
      auto both = combine_shares(enrollment->secret, *tpm_share);
      if (!both.is_ok()) return both.status();
      combined = std::move(both).value();
    }
    const SecretBuffer& passphrase = combined ? *combined : enrollment->secret;
    auto slot = format ? dev->add_keyslot_after_format(passphrase, KeyslotCost::kHighEntropySecret)
                       : dev->add_keyslot(*existing, passphrase, KeyslotCost::kHighEntropySecret);
    if (!slot.is_ok()) return slot.status();
    keyslot = slot.value();
    if (format && recovery) {
      auto r = dev->add_keyslot_after_format(*recovery, KeyslotCost::kRecoveryPassphrase);
      if (!r.is_ok()) return r.status().with_context("recovery keyslot");
      log_info(str_cat("recovery passphrase in keyslot ", r.value()));
    }
    KeygateToken t;
    t.servers = token_servers;
    t.volume_id = enrollment->volume_id;
    t.ca_pem = ca;
    t.ca_sha256 = fingerprint.value();
    t.keyslot = keyslot;
    if (evidence) {
      auto platform = evidence->platform();
      t.attestation = platform.is_ok() ? platform_name(platform.value()) : "none";
    } else {
      t.attestation = "none";
    }
    if (tpm) t.tpm = tpm->config();
    auto id = dev->add_token(t);
    if (!id.is_ok()) return id.status();
    token_id = id.value();
    auto check = dev->activate("", keyslot, passphrase);
    if (!check.is_ok()) return check.status().with_context("verify new keyslot");
    ServerEndpoint server{used_server, ca, timeout_ms(args)};
    return confirm_volume(server, enrollment->volume_id, enrollment->secret);
  };
  Status done = finish();
  if (!done.is_ok()) {
    roll_back(*dev, format, keyslot, token_id);
    return fail(done.with_context("enrollment not completed"));
  }
  print_line(str_cat(device, ": enrolled as volume ", enrollment->volume_id, " (keyslot ", keyslot,
                     ", token ", token_id, ")"));
  return kExitOk;
}

// Replaces DEVICE's keygate keyslot with one for a newly registered volume:
// an image's root volume moves from the image-group key every instance of
// the image shares to a key of its own. The old key opens the volume until
// the new keyslot, token and server record are all in place.
int cmd_rotate(const Args& args) {
  if (args.positional().size() != 2) {
    return fail(Status::error(ErrorKind::kInvalidArgument, "usage: keygate rotate DEVICE ..."), kExitUsage);
  }
  const std::string device = args.positional()[1];
  // No token file: the new volume is registered by attestation.
  auto token = args.has("enrollment-token-file")
                   ? read_secret_file(args.get("enrollment-token-file"), 256, true)
                   : Result<SecretBuffer>(SecretBuffer());
  if (!token.is_ok()) return fail(token.status(), kExitUsage);
  // The current key, exactly as a boot gets it.
  int code = kExitInternal;
  auto released = release_secret(args, device, &code);
  if (!released.is_ok()) return fail(released.status().with_context("current key"), code);
  const KeygateToken old = released->token;
  LuksDevice& dev = *released->device;
  auto found = dev.find_keygate_token();
  if (!found.is_ok() || !found->has_value()) return fail(Status::error(ErrorKind::kNotFound, "token vanished"), kExitVolume);
  const int old_token_id = found.value()->first;
  // Servers and CA: from the command line, else the volume's own.
  std::string ca = old.ca_pem;
  if (args.has("ca")) {
    auto pem = read_small_file(args.get("ca"), 64 * 1024);
    if (!pem.is_ok()) return fail(pem.status(), kExitUsage);
    ca = pem.value();
  }
  auto fingerprint = certificate_sha256_fingerprint(ca);
  if (!fingerprint.is_ok()) return fail(fingerprint.status(), kExitUsage);
  auto servers = args.has("server") ? args.get_all("server") : old.servers;
  auto token_servers = args.has("token-server") ? args.get_all("token-server") : servers;

  auto evidence = evidence_collector(args);
  if (!evidence.is_ok()) return fail(evidence.status(), kExitUsage);
  std::unique_ptr<TpmAttester> tpm;
  if (old.tpm) {
    if (!old.tpm->sealed.empty()) {
      return fail(Status::error(ErrorKind::kInvalidArgument,
                                "rotating a two-factor (TPM-sealed) volume is not supported; enroll it again"),
                  kExitUsage);
    }
    tpm = std::make_unique<TpmAttester>(tcti(args), *old.tpm);
  }
  std::string used_server;
  auto registered = register_with_first_server(
      servers, ca, args, token.value(), evidence.value().get(), tpm.get(),
      args.get("description", "rotated from " + old.volume_id), &used_server);
  if (!registered.is_ok()) return fail(registered.status());
  std::optional<Enrollment> enrollment = std::move(registered).value();
  int keyslot = -1, token_id = -1;
  auto finish = [&]() -> Status {
    auto slot = dev.add_keyslot(released->secret, enrollment->secret, KeyslotCost::kHighEntropySecret);
    if (!slot.is_ok()) return slot.status();
    keyslot = slot.value();
    KeygateToken t = old;
    t.servers = token_servers;
    t.volume_id = enrollment->volume_id;
    t.ca_pem = ca;
    t.ca_sha256 = fingerprint.value();
    t.keyslot = keyslot;
    auto id = dev.add_token(t);
    if (!id.is_ok()) return id.status();
    token_id = id.value();
    auto check = dev.activate("", keyslot, enrollment->secret);
    if (!check.is_ok()) return check.status().with_context("verify new keyslot");
    return confirm_volume(ServerEndpoint{used_server, ca, timeout_ms(args)}, enrollment->volume_id,
                          enrollment->secret);
  };
  Status done = finish();
  if (!done.is_ok()) {
    roll_back(dev, false, keyslot, token_id);
    return fail(done.with_context("rotation not completed; the old key still opens the volume"));
  }
  // Only now does the shared key go.
  Status removed = dev.remove_token(old_token_id);
  if (removed.is_ok()) removed = dev.destroy_keyslot(old.keyslot);
  if (!removed.is_ok()) return fail(removed.with_context("remove the old keyslot (run rotate again)"), kExitVolume);
  print_line(str_cat(device, ": rotated from volume ", old.volume_id, " to volume ",
                     enrollment->volume_id, " (keyslot ", keyslot, ")"));
  return kExitOk;
}

// Image builders: encrypts an unmounted image in place, then enrolls it with
// the recovery passphrase as the existing passphrase.
int cmd_encrypt(const Args& args) {
  auto usage = [](const std::string& m) {
    return fail(Status::error(ErrorKind::kInvalidArgument, m), kExitUsage);
  };
  if (args.positional().size() != 2) return usage("usage: keygate encrypt IMAGE ...");
  const std::string image = args.positional()[1];
  if (!args.has("recovery-passphrase-file")) {
    return usage("encrypt needs --recovery-passphrase-file (the passphrase that opens the image "
                 "when no key server can)");
  }
  // Enrollment's inputs are checked first: nothing is encrypted for a run
  // that could not enroll. (No token: enrollment by attestation.)
  if (args.get_all("server").empty() || !args.has("ca")) {
    return usage("encrypt enrolls the image too: give --server and --ca (and "
                 "--enrollment-token-file, or instance evidence)");
  }
  if (!args.has("enrollment-token-file") && args.has("no-evidence")) {
    return usage("encrypt --no-evidence needs --enrollment-token-file");
  }
  for (const char* file : {"ca", "enrollment-token-file"}) {
    if (args.has(file) && args.get(file) != "-" && access(args.get(file).c_str(), R_OK) != 0) {
      return usage(str_cat("--", file, " ", args.get(file), ": not readable"));
    }
  }
  auto recovery = read_secret_file(args.get("recovery-passphrase-file"), 512, false);
  if (!recovery.is_ok()) return fail(recovery.status(), kExitUsage);

  struct stat st;
  if (stat(image.c_str(), &st) != 0) return usage(str_cat(image, ": ", strerror(errno)));
  const bool resuming = LuksDevice::open(image).is_ok();
  uint64_t reduce = 16u << 20;
  if (S_ISBLK(st.st_mode) && !args.has("reduce-device-size") && !resuming) {
    return usage(str_cat(image, " is a block device: shrink its filesystem by 16 MiB and pass "
                         "--reduce-device-size 16777216 to confirm the last 16 MiB are unused"));
  }
  if (args.has("reduce-device-size")) {
    auto r = args.get_int("reduce-device-size", 16 << 20, 2 << 20, 1L << 30);
    if (!r.is_ok()) return fail(r.status(), kExitUsage);
    reduce = static_cast<uint64_t>(r.value());
  }
  if (!resuming) {
    Status blank = check_device_blank(image);
    if (blank.is_ok()) {
      return usage(str_cat(image, " holds no filesystem to encrypt; use keygate enroll --format"));
    }
    if (S_ISREG(st.st_mode) && !args.has("reduce-device-size")) {
      // Room for the header at the end, so no byte of the image is lost.
      if (truncate(image.c_str(), st.st_size + static_cast<off_t>(reduce)) != 0) {
        return fail(Status::error(ErrorKind::kIo, str_cat("grow ", image, ": ", strerror(errno))),
                    kExitVolume);
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
    return fail(encrypted.with_context("encryption stopped; run the same command again to resume"),
                kExitVolume);
  }
  print_line(str_cat(image, ": encrypted in place (LUKS2); enrolling"));
  return cmd_enroll(args.with("passphrase-file", args.get("recovery-passphrase-file"),
                              {"enroll", image}));
}

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
      {"metadata-url", "platform", "tcti", "tpm", "tpm-pcrs", "tpm-bank", "tpm-ak-handle", "timeout", "deadline", "server", "token-server", "ca", "enrollment-token-file",
       "recovery-passphrase-file", "passphrase-file", "sector-size", "description",
       "reduce-device-size"},
      {"verify-only", "format", "no-recovery", "no-evidence", "tpm-seal", "json", "debug", "kmsg",
       "help", "version"});
  log_init("keygate", LogSink::kStderr, LogLevel::kInfo);
  if (!args.is_ok()) {
    log_error(args.status().message());
    fputs(kUsage, stderr);
    return kExitUsage;
  }
  if (args->has("help")) {
    fputs(kUsage, stdout);
    return kExitOk;
  }
  if (args->has("version")) {
    // The build and the libraries it runs with: what a bug report needs.
    printf("keygate %s (%s)\n%s\n", KEYGATE_VERSION,
           KEYGATE_STATIC_BUILD ? "static release build" : "shared-library build", curl_version());
    return kExitOk;
  }
  log_init("keygate", args->has("kmsg") ? LogSink::kKmsg : LogSink::kStderr,
           args->has("debug") ? LogLevel::kDebug : LogLevel::kInfo);
  install_cryptsetup_logging(args->has("debug"));
  const auto& pos = args->positional();
  if (pos.empty()) {
    fputs(kUsage, stderr);
    return kExitUsage;
  }
  if (pos[0] == "unlock") return cmd_unlock(args.value());
  if (pos[0] == "enroll") return cmd_enroll(args.value());
  if (pos[0] == "status") return cmd_status(args.value());
  if (pos[0] == "keyscript") return cmd_keyscript(args.value());
  if (pos[0] == "encrypt") return cmd_encrypt(args.value());
  if (pos[0] == "rotate") return cmd_rotate(args.value());
  log_error(str_cat("unknown command '", pos[0], "'"));
  fputs(kUsage, stderr);
  return kExitUsage;
}
