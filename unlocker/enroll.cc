#include "unlocker/enroll.h"

#include <functional>
#include <memory>

#include "core/crypto.h"
#include "core/log.h"
#include "unlocker/evidence.h"
#include "unlocker/failover.h"
#include "unlocker/luks.h"
#include "unlocker/server_client.h"
#include "unlocker/tpm_attest.h"

namespace keygate::unlocker {
namespace {

// Phase 1: registers with the first server that answers. A refusal or a bad
// request ends it (the next server would answer the same).
struct Registered {
  Enrollment enrollment;
  std::string server;
};

Result<Registered> register_with_first_server(const ServerChoice& choice, long timeout_ms,
                                              const SecretBuffer& token,
                                              EvidenceCollector* evidence, TpmAttester* tpm,
                                              const std::string& description,
                                              const Replacing* replacing = nullptr) {
  Status last = Status::error(ErrorKind::kInvalidArgument, "no key server given");
  for (const auto& url : choice.servers) {
    auto r = register_volume(ServerEndpoint{url, choice.ca_pem, timeout_ms}, token, evidence, tpm,
                             description, replacing);
    if (r.is_ok()) {
      log_info(str_cat("registered volume ", r->volume_id, " with ", url));
      return Registered{std::move(r).value(), url};
    }
    last = r.status();
    log_warning(last.message());
    if (last.kind() != ErrorKind::kUnavailable && last.kind() != ErrorKind::kUntrusted) break;
  }
  return last;
}

// Undoes a partial phase 2 so the device is as it was.
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

// How long a confirm whose answer did not arrive is asked again when no
// --deadline is given.
constexpr long kDefaultConfirmWindowMs = 30000;

// The confirm, asked again with backoff while the server cannot be reached
// or answers 429/5xx, for up to `window_ms`: the server may have committed
// it and lost only its answer, and it accepts the same confirm again. A
// refusal is final at once.
Status confirm_within(const ServerEndpoint& server, const std::string& volume_id,
                      const SecretBuffer& secret, long window_ms) {
  RetryClock& clock = steady_retry_clock();
  const RetryPolicy backoff;
  const long start = clock.now_ms();
  for (int round = 1;; ++round) {
    ServerEndpoint bounded = server;
    bounded.timeout_ms = std::max(1L, std::min(server.timeout_ms, window_ms - (clock.now_ms() - start)));
    Status s = confirm_volume(bounded, volume_id, secret);
    if (s.is_ok() || s.kind() != ErrorKind::kUnavailable) return s;
    const long delay = backoff_delay_ms(backoff, round);
    if (clock.now_ms() - start + delay >= window_ms) {
      return s.with_context(str_cat("confirm not answered within ", window_ms / 1000, " s"));
    }
    log_warning(str_cat("confirm: ", s.message(), "; asking again in ", delay, " ms"));
    clock.sleep_ms(delay);
  }
}

// After a roll back: the server is told, so that the volume it holds for a
// keyslot that is gone does not stay pending. Best effort; what is left to
// an administrator is said.
void abandon(const ServerEndpoint& server, const std::string& volume_id, const SecretBuffer& secret) {
  Status s = abandon_volume(server, volume_id, secret);
  if (s.is_ok()) {
    log_warning(str_cat("volume ", volume_id, " abandoned: the server revoked it"));
  } else if (s.kind() == ErrorKind::kConflict) {
    log_error(str_cat("the server has volume ", volume_id, " active, but its keyslot was removed "
                      "here: revoke it (keygate-server volumes revoke ", volume_id, ")"));
  } else {
    log_error(str_cat("could not tell the server to abandon volume ", volume_id, " (", s.message(),
                      "): it stays on the server; revoke it (keygate-server volumes revoke ",
                      volume_id, ")"));
  }
}

// Phase 2, the same for every kind of enrollment: `add_keyslot` puts
// `passphrase` in a new keyslot (and returns it), `token` (servers, CA,
// platform, TPM already filled in) gets the keyslot and the volume id, the
// keyslot is checked to open, and the server is told (within the confirm
// window). Any failure undoes what was added (the whole header when
// `formatted`) and tells the server the volume is abandoned.
struct Installed {
  int keyslot = -1;
  int token_id = -1;
};

Result<Installed> install_and_confirm(LuksDevice& dev, bool formatted,
                                      const std::function<Result<int>()>& add_keyslot,
                                      const SecretBuffer& passphrase, KeygateToken token,
                                      const Registered& registered, const std::string& ca_pem,
                                      const ReleaseSettings& settings) {
  const ServerEndpoint server{registered.server, ca_pem, settings.request_timeout_ms};
  const long window_ms = settings.deadline_ms > 0 ? settings.deadline_ms : kDefaultConfirmWindowMs;
  Installed out;
  auto steps = [&]() -> Status {
    auto slot = add_keyslot();
    if (!slot.is_ok()) return as_volume_failure(slot.status());
    out.keyslot = slot.value();
    token.volume_id = registered.enrollment.volume_id;
    token.keyslot = out.keyslot;
    auto id = dev.add_token(token);
    if (!id.is_ok()) return as_volume_failure(id.status());
    out.token_id = id.value();
    auto check = dev.activate("", out.keyslot, passphrase);
    if (!check.is_ok()) return as_volume_failure(check.status().with_context("verify new keyslot"));
    return confirm_within(server, registered.enrollment.volume_id, registered.enrollment.secret,
                          window_ms);
  };
  Status done = steps();
  if (!done.is_ok()) {
    roll_back(dev, formatted, out.keyslot, out.token_id);
    abandon(server, registered.enrollment.volume_id, registered.enrollment.secret);
    return done;
  }
  return out;
}

Status usage(std::string message) {
  return Status::error(ErrorKind::kInvalidArgument, std::move(message));
}

}  // namespace

Result<ServerChoice> choose_servers(std::vector<std::string> servers,
                                    std::vector<std::string> token_servers, std::string ca_pem) {
  KEYGATE_RETURN_IF_ERROR(check_server_list(servers, "--server"));
  KEYGATE_RETURN_IF_ERROR(check_server_list(token_servers, "--token-server"));
  auto fingerprint = certificate_sha256_fingerprint(ca_pem);
  if (!fingerprint.is_ok()) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("CA certificate: ", fingerprint.status().message()));
  }
  return ServerChoice{std::move(servers), std::move(token_servers), std::move(ca_pem),
                      std::move(fingerprint).value()};
}

Result<Enrolled> enroll_volume(const EnrollRequest& r) {
  if (r.format == r.existing.has_value()) {
    return usage(r.format ? "--format takes no existing passphrase"
                          : "enrolling an existing LUKS2 volume needs --passphrase-file (or --format)");
  }
  if (r.recovery && !r.format) return usage("a recovery keyslot is added only with --format");
  if (r.sector_size != 512 && r.sector_size != 4096) return usage("--sector-size must be 512 or 4096");
  if (r.enrollment_token.empty() && !r.with_evidence) {
    return usage("enroll needs --enrollment-token-file, or instance evidence (enrollment by "
                 "attestation, where the server's rules allow it)");
  }
  // The device, before anything is changed.
  std::optional<LuksDevice> dev;
  if (r.format) {
    Status blank = check_device_blank(r.device);
    if (!blank.is_ok()) return as_volume_failure(blank);
  } else {
    auto opened = LuksDevice::open(r.device);
    if (!opened.is_ok()) return as_volume_failure(opened.status());
    dev = std::move(opened).value();
    auto found = dev->find_keygate_token();
    if (!found.is_ok()) return as_volume_failure(found.status());
    if (found->has_value()) {
      return Status::error(ErrorKind::kConflict,
                           str_cat(r.device, " is already enrolled (volume ",
                                   found.value()->second.volume_id, ")"));
    }
    if (!dev->activate("", -1, *r.existing).is_ok()) {
      return Status::error(ErrorKind::kIo,
                           str_cat(r.device, ": the --passphrase-file passphrase opens no keyslot"));
    }
  }
  std::unique_ptr<EvidenceCollector> evidence;
  std::string attestation = "none";
  if (r.with_evidence) {
    evidence = std::make_unique<EvidenceCollector>(r.settings.metadata_url, r.settings.platform,
                                                   r.settings.request_timeout_ms);
    auto platform = evidence->platform();
    if (!platform.is_ok()) return platform.status();
    attestation = platform_name(platform.value());
    log_info(str_cat("platform: ", attestation));
  }
  // The TPM: auto uses one if present; the second factor implies required.
  const TpmMode tpm_mode = r.tpm_seal ? TpmMode::kRequired : r.tpm_mode;
  std::unique_ptr<TpmAttester> tpm;
  std::optional<SecretBuffer> tpm_share;
  if (tpm_mode != TpmMode::kOff) {
    tpm = std::make_unique<TpmAttester>(r.settings.tcti, r.tpm);
    Status ready = tpm->ready();
    if (!ready.is_ok()) {
      if (tpm_mode == TpmMode::kRequired) return as_volume_failure(ready);
      log_info(str_cat("no TPM used (--tpm auto): ", ready.message()));
      tpm.reset();
    } else if (r.tpm_seal) {
      auto share = tpm->seal_new_share();
      if (!share.is_ok()) return as_volume_failure(share.status().with_context("seal the TPM share"));
      tpm_share = std::move(share).value();
    }
    if (tpm) {
      std::string pcrs;
      for (uint32_t pcr : r.tpm.pcrs) pcrs += str_cat(pcrs.empty() ? "" : ",", pcr);
      log_info(str_cat("TPM: quotes over ", r.tpm.bank, " PCRs ", pcrs,
                       tpm_share ? ", second factor sealed" : ""));
    }
  }
  auto registered = register_with_first_server(r.servers, r.settings.request_timeout_ms,
                                               r.enrollment_token, evidence.get(), tpm.get(),
                                               r.description);
  if (!registered.is_ok()) return registered.status();
  const Enrollment& enrollment = registered->enrollment;

  if (r.format) {
    auto formatted = LuksDevice::format(r.device, r.sector_size);
    if (!formatted.is_ok()) return as_volume_failure(formatted.status());
    dev = std::move(formatted).value();
  }
  // The keyslot's passphrase: the server's secret, or with a TPM share the
  // two together.
  std::optional<SecretBuffer> combined;
  if (tpm_share) {
    auto both = combine_shares(enrollment.secret, *tpm_share);
    if (!both.is_ok()) return both.status();
    combined = std::move(both).value();
  }
  const SecretBuffer& passphrase = combined ? *combined : enrollment.secret;
  auto add_keyslot = [&]() -> Result<int> {
    auto slot = r.format ? dev->add_keyslot_after_format(passphrase, KeyslotCost::kHighEntropySecret)
                         : dev->add_keyslot(*r.existing, passphrase, KeyslotCost::kHighEntropySecret);
    if (!slot.is_ok() || !r.recovery) return slot;
    auto recovery = dev->add_keyslot_after_format(*r.recovery, KeyslotCost::kRecoveryPassphrase);
    if (!recovery.is_ok()) return recovery.status().with_context("recovery keyslot");
    log_info(str_cat("recovery passphrase in keyslot ", recovery.value()));
    return slot;
  };
  KeygateToken token;
  token.servers = r.servers.token_servers;
  token.ca_pem = r.servers.ca_pem;
  token.ca_sha256 = r.servers.ca_sha256;
  token.attestation = attestation;
  if (tpm) token.tpm = tpm->config();
  auto installed = install_and_confirm(*dev, r.format, add_keyslot, passphrase, std::move(token),
                                       registered.value(), r.servers.ca_pem, r.settings);
  if (!installed.is_ok()) return installed.status().with_context("enrollment not completed");
  return Enrolled{enrollment.volume_id, installed->keyslot, installed->token_id};
}

Result<Rotated> rotate_volume(const RotateRequest& r) {
  // What was given is checked before any server is asked anything.
  if (r.servers) KEYGATE_RETURN_IF_ERROR(check_server_list(*r.servers, "--server"));
  if (r.token_servers) KEYGATE_RETURN_IF_ERROR(check_server_list(*r.token_servers, "--token-server"));
  if (r.ca_pem && !certificate_sha256_fingerprint(*r.ca_pem).is_ok()) {
    return usage("--ca: not a PEM certificate");
  }
  // The current key, exactly as a boot gets it, checked against its keyslot.
  auto current = release_volume(r.device, r.settings);
  if (!current.is_ok()) return current.status().with_context("current key");
  const KeygateToken& old = current->token;
  if (old.tpm && !old.tpm->sealed.empty()) {
    return usage("rotating a two-factor (TPM-sealed) volume is not supported; enroll it again");
  }
  // Servers and CA: as given, else the volume's own.
  auto servers = r.servers.value_or(old.servers);
  auto choice = choose_servers(servers, r.token_servers.value_or(servers),
                               r.ca_pem.value_or(old.ca_pem));
  if (!choice.is_ok()) return choice.status();
  LuksDevice& dev = current->device;

  EvidenceCollector evidence(r.settings.metadata_url, r.settings.platform,
                             r.settings.request_timeout_ms);
  std::unique_ptr<TpmAttester> tpm;
  if (old.tpm) tpm = std::make_unique<TpmAttester>(r.settings.tcti, *old.tpm);
  // The server retires the old volume once the new one is confirmed (if it
  // was this instance's alone): copies of the device made before then no
  // longer open. The proof shows this client holds the old secret now.
  const Replacing replacing{old.volume_id, &current->passphrase};
  auto registered = register_with_first_server(
      choice.value(), r.settings.request_timeout_ms, r.enrollment_token, &evidence, tpm.get(),
      r.description.empty() ? "rotated from " + old.volume_id : r.description, &replacing);
  if (!registered.is_ok()) return registered.status();
  const SecretBuffer& passphrase = registered->enrollment.secret;
  KeygateToken token = old;
  token.servers = choice->token_servers;
  token.ca_pem = choice->ca_pem;
  token.ca_sha256 = choice->ca_sha256;
  auto installed = install_and_confirm(
      dev, false,
      [&] { return dev.add_keyslot(current->passphrase, passphrase, KeyslotCost::kHighEntropySecret); },
      passphrase, std::move(token), registered.value(), choice->ca_pem, r.settings);
  if (!installed.is_ok()) {
    return installed.status().with_context("rotation not completed; the old key still opens the volume");
  }
  // Only now does the shared key go.
  Status removed = dev.remove_token(current->token_id);
  if (removed.is_ok()) removed = dev.destroy_keyslot(old.keyslot);
  if (!removed.is_ok()) {
    return as_volume_failure(removed.with_context("remove the old keyslot (run rotate again)"));
  }
  return Rotated{old.volume_id, registered->enrollment.volume_id, installed->keyslot};
}

}  // namespace keygate::unlocker
