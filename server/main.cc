// keygate-server: releases volume keys to instances that prove who they are.
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "core/args.h"
#include "core/clock.h"
#include "core/crypto.h"
#include "core/json.h"
#include "core/log.h"
#include "core/file.h"
#include "server/admin_command.h"
#include "server/audit_chain.h"
#include "server/aws_identity.h"
#include "server/admin_api.h"
#include "server/admin_ca.h"
#include "server/http_api.h"
#include "server/key_service.h"
#include "server/policy_file.h"
#include "server/settings.h"
#include "server/state_files.h"
#include "server/store.h"
#include "server/volume_edits.h"

using namespace keygate;
using namespace keygate::server;

namespace {

constexpr char kUsage[] = R"(usage: keygate-server COMMAND [options]

Commands:
  serve            run the HTTPS key server; on the same port, for people
                   with an admin certificate: the web console (/console/)
                   and Prometheus metrics (/metrics)
  token create     create an enrollment token (printed once)
  volumes list     list enrolled volumes
  volumes revoke ID [--instance INSTANCE]
                   refuse every future unlock of volume ID; with
                   --instance, of an image group's volume: refuse only
                   that instance (its instance_id claim; Azure: vm_id),
                   the group's others still unlock it
  volumes accept-next ID [--ttl SECONDS]
                   TPM volumes, before a planned kernel/firmware update: the
                   next otherwise valid unlock with other PCR values is
                   accepted once and its values become the baseline
                   (armed for --ttl, default 86400)
  volumes pcr-allow ID PCR=HEX [PCR=HEX ...]
                   TPM volumes: accept these values too (an allow-list)
  audit            show the most recent audit events (--limit N, default 50)
  audit verify     prove the audit trail's hash chain unbroken: prints its
                   head (SEQ:HASH) or names the first bad record (exit 3)
                     --head SEQ:HASH  a head kept from an earlier verify
                                      must still be in the trail
                     --file FILE      verify an export instead of the store
  audit export     the whole trail as JSON lines, one record each
                     --output FILE    write FILE (whole or not at all)
                                      instead of standard output
  ca               print the CA certificate clients pin, and its fingerprint
  migrate-store --to CONNINFO
                   copy the state folder's SQLite store into an empty
                   PostgreSQL database (servers stopped): every volume,
                   token, approval request, admin certificate and the
                   audit trail as it is, in one transaction; both chains
                   verified to the same head
  policy check [FILE]
                   validate a policy file (default: --policy-file); an
                   error names its line
  admin bootstrap --name NAME [--out DIR] [--server-url URL] [--days N]
                   the first admin certificate (role admin), from the
                   state folder: its key, certificate, the server's CA and
                   URL in DIR (default $KEYGATE_ADMIN_DIR or ~/.keygate-admin);
                   refused once an admin certificate is in force
  admin COMMAND    the admin API (mTLS with the certificate in --admin-dir;
                   --server URL overrides the folder's), on any replica:
                     whoami
                     requests [--all]          pending approval requests
                     request ID
                     approve ID --reason TEXT  (approver, admin)
                     deny ID --reason TEXT     (approver, admin)
                     volumes
                     volume ID                 one volume, its policy (known and
                                               revoked instances)
                     instances                 every volume's bound instance, and
                                               image groups' known and revoked ones
                     revoke VOLUME_ID [--instance ID]          (admin; with
                                               --instance, one instance of
                                               an image group)
                     rotate VOLUME_ID [--ttl S]  (admin) a one-use token for
                                               the volume's instance: its
                                               keygate rotate moves it to a
                                               new secret and retires this one
                     token create [token create's options]   (admin; the
                                               issuer may not approve the
                                               volume's releases)
                     certs
                     cert issue --name NAME --role viewer|approver|admin
                                --out DIR [--days N]          (admin)
                     cert revoke SERIAL        (admin)
                     policy reload             (admin)
                   --json prints the API's answer as it is

Common options:
  --state-dir DIR  store, KEK and TLS material (default /var/lib/keygate)
  --config FILE    JSON file with any of: listen, state_dir, aws_trust_dirs,
                   gcp_jwks_files, azure_trust_dirs, evidence_max_age,
                   tls_san, nonce_ttl, enroll_by_attestation (rules that
                   let matching instances enroll without a token; see
                   README), rate_limits (per_source, per_instance: each
                   {"per_second": R, "burst": B}; default 50/s burst 100
                   per address, 1/s burst 20 per instance; 0: off),
                   connections ({"max": N, "per_source": M}: connections
                   open at once, in all and from one address; default
                   8192 and 128; past them a new one is closed at once),
                   pending_ttl (seconds a registered volume may stay
                   unconfirmed before it is revoked; default 86400),
                   policy_file (as --policy-file), store (as --store),
                   store_connections (the PostgreSQL store's connections
                   per process; default 8), webhook ({"url": "https://...",
                   "ca_file": F, "secret_file": F, "refusal_spike": N}:
                   notifications of approval requests and decisions,
                   refusal spikes and audit write failures; see README)
                   (options on the command line win)
  --store CONNINFO PostgreSQL connection string (key=value pairs or a
                   postgresql:// URI; no password in it: use a password
                   file or a service file). Without it, the state folder's
                   store.conf if present, else SQLite in the state folder.
                   Every replica and every command needs the same one.

  --policy-file FILE        named policies tokens can refer to (README
                            "Policy file"); serve reloads it on SIGHUP, and
                            a file with an error is refused (the policy in
                            effect stays)

serve options:
  --listen HOST:PORT        address to bind (default 127.0.0.1:8443; port 0: any)
  --port-file FILE          write the bound port here
  --tls-san NAME            subject alt name for the generated certificate,
                            "DNS:host" or "IP:addr" (repeatable; localhost and
                            127.0.0.1 are always included)
  --aws-trust-dir DIR       extra <region>.pem certificates for AWS rsa2048
                            identity signatures (repeatable; added to the
                            shipped AWS certificates)
  --no-default-aws-trust    do not load the shipped AWS certificates
  --gcp-jwks FILE           Google's signing keys as a JWK set (the content of
                            https://www.googleapis.com/oauth2/v3/certs);
                            re-read when the file changes (repeatable).
                            Without one, GCP evidence is refused.
  --azure-trust-dir DIR     PEM certificates for Azure attested documents:
                            self-signed ones are roots, the others Microsoft's
                            intermediates (repeatable). Without one, Azure
                            evidence is refused.
  --evidence-max-age SECONDS
                            oldest GCP token / Azure document accepted
                            (default 300; clocks may differ by 60 s more)
  --nonce-ttl SECONDS       challenge lifetime (default 60)
  --log-level LEVEL         debug, info, warning, error (default info)

token create options:
  --platform aws|gcp|azure  the platform the volume lives on (default aws)
  --account ID              AWS account id, GCP project id, Azure subscription id
  --region NAME             AWS region or GCP zone
  --image-id AMI            AWS image id
  --require CLAIM=VALUE     bind any claim of the platform (repeatable; see
                            README "Policies"); claims left out are taken from
                            the enrolling instance's verified identity
  --image-group             the volume belongs to an image: any instance of
                            it (AWS: account + region + image; GCP: project;
                            Azure: subscription, plus --require) may unlock it
  --ttl SECONDS             token lifetime (default 3600)
  --uses N                  enrollments allowed (default 1)
  --policy NAME             volumes enrolled with the token are released only
                            while the policy file's policy NAME admits the
                            instance too (checked against --policy-file)

Exit status: 0 success, 1 failure, 2 usage or configuration error, 3 the
audit trail's chain is broken (audit verify, audit export), or the admin
API refused (not authenticated, or not this role's or person's to do).
)";

const std::set<std::string> kValueOptions = {"state-dir",
                                             "config",
                                             "listen",
                                             "port-file",
                                             "tls-san",
                                             "aws-trust-dir",
                                             "nonce-ttl",
                                             "log-level",
                                             "account",
                                             "region",
                                             "image-id",
                                             "ttl",
                                             "uses",
                                             "limit",
                                             "gcp-jwks",
                                             "azure-trust-dir",
                                             "evidence-max-age",
                                             "platform",
                                             "require",
                                             "head",
                                             "instance",
                                             "policy",
                                             "policy-file",
                                             "file",
                                             "output",
                                             "name",
                                             "role",
                                             "days",
                                             "out",
                                             "reason",
                                             "server",
                                             "admin-dir",
                                             "server-url",
                                             "store",
                                             "to"};
const std::set<std::string> kFlagOptions = {"no-default-aws-trust", "image-group", "json",
                                            "help", "all"};

int fail(const Status& s) {
  log_error(s.message());
  return s.kind() == ErrorKind::kInvalidArgument ? 2 : 1;
}

std::string executable_dir() {
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  std::string path(buf, static_cast<size_t>(n));
  return path.substr(0, path.find_last_of('/'));
}

// The shipped AWS certificates live in <prefix>/share/keygate/trust/aws,
// found relative to the binary (<prefix>/bin) so build trees work too.
std::string default_aws_trust_dir() {
  return executable_dir() + "/../share/keygate/trust/aws/rsa2048";
}

Result<Settings> load_settings(const Args& args) {
  Settings s;
  if (args.has("config")) {
    auto text = read_small_file(args.get("config"), kMaxSettingsFile);
    if (!text.is_ok()) return text.status();
    auto parsed = parse_settings(text.value());
    if (!parsed.is_ok()) return parsed.status().with_context(args.get("config"));
    s = std::move(parsed).value();
  }
  s.state_dir = args.get("state-dir", s.state_dir);
  s.listen = args.get("listen", s.listen);
  s.policy_file = args.get("policy-file", s.policy_file);
  s.store = args.get("store", s.store);
  if (args.has("store"))
    KEYGATE_RETURN_IF_ERROR(check_postgres_conninfo(s.store).with_context("--store"));
  for (const auto& d : args.get_all("aws-trust-dir")) s.aws_trust_dirs.push_back(d);
  for (const auto& d : args.get_all("gcp-jwks")) s.gcp_jwks_files.push_back(d);
  for (const auto& d : args.get_all("azure-trust-dir")) s.azure_trust_dirs.push_back(d);
  for (const auto& d : args.get_all("tls-san")) s.tls_san.push_back(d);
  auto ttl = args.get_int("nonce-ttl", s.nonce_ttl, 1, 3600);
  if (!ttl.is_ok()) return ttl.status();
  s.nonce_ttl = ttl.value();
  auto age = args.get_int("evidence-max-age", s.evidence_max_age, 10, 6 * 3600);
  if (!age.is_ok()) return age.status();
  s.evidence_max_age = age.value();
  return s;
}

int cmd_serve(const Args& args, const Settings& s) {
  auto colon = s.listen.rfind(':');
  if (colon == std::string::npos) {
    return fail(Status::error(ErrorKind::kInvalidArgument, "--listen must be HOST:PORT"));
  }
  HttpOptions http;
  http.host = s.listen.substr(0, colon);
  try {
    http.port = std::stoi(s.listen.substr(colon + 1));
  } catch (...) {
    return fail(Status::error(ErrorKind::kInvalidArgument, "--listen: bad port"));
  }
  http.port_file = args.get("port-file");
  http.max_connections = s.max_connections;
  http.max_connections_per_source = s.max_connections_per_source;
  http.cert_file = s.state_dir + "/server.pem";
  http.key_file = s.state_dir + "/server.key";

  auto store = open_store(s);
  if (!store.is_ok()) return fail(store.status());
  auto kek = load_or_create_kek(s.state_dir + "/kek");
  if (!kek.is_ok()) return fail(kek.status());
  std::vector<std::string> sans = {"DNS:localhost", "IP:127.0.0.1"};
  for (const auto& san : s.tls_san) sans.push_back(san);
  Status tls = ensure_tls_material(s.state_dir, sans);
  if (!tls.is_ok()) return fail(tls);

  EvidenceTrust trust;
  trust.max_age_seconds = s.evidence_max_age;
  if (!args.has("no-default-aws-trust")) {
    Status st = trust.aws.add_directory(default_aws_trust_dir());
    if (!st.is_ok()) return fail(st.with_context("shipped AWS trust store"));
  }
  for (const auto& dir : s.aws_trust_dirs) {
    Status st = trust.aws.add_directory(dir);
    if (!st.is_ok()) return fail(st);
  }
  for (const auto& file : s.gcp_jwks_files) {
    Status st = trust.gcp.add_file(file);
    if (!st.is_ok()) return fail(st);
  }
  for (const auto& dir : s.azure_trust_dirs) {
    Status st = trust.azure.add_directory(dir);
    if (!st.is_ok()) return fail(st);
  }
  log_info(str_cat("trust: AWS ", trust.aws.certificate_count(), " certificates for ",
                   trust.aws.region_count(), " regions; GCP ",
                   trust.gcp.empty() ? std::string("off (no --gcp-jwks)")
                                     : str_cat(trust.gcp.keys()->size(), " keys"),
                   "; Azure ",
                   trust.azure.root_count() == 0
                       ? std::string("off (no --azure-trust-dir)")
                       : str_cat(trust.azure.root_count(), " roots, ",
                                 trust.azure.intermediate_count(), " intermediates")));
  auto ca = read_small_file(s.state_dir + "/ca.pem", 64 * 1024);
  if (ca.is_ok()) {
    auto fp = certificate_sha256_fingerprint(ca.value());
    if (fp.is_ok()) log_info(str_cat("CA fingerprint sha256:", fp.value()));
  }
  SystemClock clock;
  ServiceOptions options;
  options.nonce_ttl_seconds = static_cast<int>(s.nonce_ttl);
  options.attestation_enrollment = s.attestation_enrollment;
  options.per_source = s.per_source;
  options.per_instance = s.per_instance;
  options.pending_ttl_seconds = s.pending_ttl;
  auto limit = [](const RateLimit& l) {
    if (l.per_second <= 0) return std::string("off");
    char text[96];
    std::snprintf(text, sizeof text, "%g/s (burst %g)", l.per_second, l.burst);
    return std::string(text);
  };
  log_info(str_cat("rate limits: per source ", limit(s.per_source), ", per instance ",
                   limit(s.per_instance), "; connections at most ", s.max_connections,
                   ", from one address ", s.max_connections_per_source));
  if (!s.attestation_enrollment.empty()) {
    log_info(str_cat("enrollment by attestation: ", s.attestation_enrollment.size(), " rule(s)"));
  }
  PolicyRegistry policies;
  // Each load of the policy file, and each refusal of one, is on the audit
  // trail with the file's hash and who asked (SIGHUP: "local"). A file
  // refused at start stops the start; one refused later leaves the policy
  // in effect as it was.
  auto load_policies = [&policies, &store, &clock, file = s.policy_file](
                           bool at_start, const std::string& who) -> Result<std::string> {
    auto read = read_policy_file(file);
    const std::string by = who == "local" ? "" : str_cat(", by ", who);
    if (!read.is_ok()) {
      const std::string why = read.status().message();
      if (!at_start) log_error(str_cat("policy file refused; the policy in effect stays: ", why));
      (void)store.value()->append_audit(AuditEvent{clock.now_unix(), "policy.load", "refused", "", "local", why + by});
      return read.status();
    }
    read->loaded_by = who == "local" ? "" : who;
    std::string detail =
        str_cat(file, " sha256 ", read->sha256, ", ", read->policies.size(), " policies");
    const AuditEvent event{clock.now_unix(), "policy.load", "ok", "", "local", detail + by};
    if (store.value()->shares_policy()) {
      // Replicas: the load is the newest version, in force on every replica
      // (each takes it before its next use). A start with the file already
      // in force publishes nothing new.
      auto latest = store.value()->latest_policy(false);
      if (!latest.is_ok()) return latest.status();
      if (at_start && latest->version != 0 && latest->sha256 == read->sha256) {
        read->version = latest->version;
      } else {
        auto version = store.value()->publish_policy(
            PolicyVersion{0, read->sha256, read->text, read->loaded_by}, event);
        if (!version.is_ok()) return version.status();
        read->version = version.value();
      }
      detail += str_cat(", version ", read->version);
    } else {
      KEYGATE_RETURN_IF_ERROR(store.value()->append_audit(event));
    }
    policies.install(std::make_shared<const PolicySet>(std::move(read).value()));
    log_info(str_cat("policy file loaded: ", detail, by));
    return detail;
  };
  AdminService::PolicyReload reload;
  if (!s.policy_file.empty()) {
    auto loaded = load_policies(true, "local");
    if (!loaded.is_ok()) {
      const Status& st = loaded.status();
      return fail(st.kind() == ErrorKind::kInvalidArgument ? st : st.with_context("policy file"));
    }
    options.policies = &policies;
    http.on_reload = [&load_policies] { (void)load_policies(false, "local"); };
    reload = [&load_policies](const std::string& who) { return load_policies(false, who); };
  }
  auto admin_ca = AdminCa::load_or_create(s.state_dir);
  if (!admin_ca.is_ok()) return fail(admin_ca.status());
  http.admin_ca_file = admin_ca->cert_file();
  // Metrics (/metrics) and webhook notifications (README "Operators' view").
  Operations operations(clock, s.webhook.url.empty() ? 0 : s.webhook.refusal_spike);
  if (!s.webhook.url.empty()) {
    auto webhook = Webhook::open(s.webhook, clock, [&operations](const char* o) { operations.webhook_outcome(o); });
    if (!webhook.is_ok()) return fail(webhook.status());
    operations.attach_webhook(std::move(webhook).value());
    log_info(str_cat("webhook notifications to ", printable(s.webhook.url, 256), " (refusal spike: ",
                     s.webhook.refusal_spike, " a minute)"));
  }
  options.operations = &operations;
  AdminService admin(*store.value(), clock, admin_ca.value(), options.policies, reload, &operations);
  KeyService service(*store.value(), std::move(kek).value(), trust, clock, options);
  // Pending volumes left from before this start (a client that died
  // between register and confirm), past their time.
  auto expired = service.expire_pending_volumes();
  if (expired.is_ok() && expired.value() > 0) {
    log_info(str_cat("revoked ", expired.value(), " pending volume(s) never confirmed within ",
                     s.pending_ttl, " s"));
  }
  Status served = serve_https(service, &admin, http);
  if (!served.is_ok()) return fail(served);
  return 0;
}

// --account/--region/--image-id name each platform's usual claims;
// --require names any claim.
Result<EnrollmentTemplate> template_from_args(const Args& args) {
  EnrollmentTemplate tmpl;
  tmpl.platform = args.get("platform", "aws");
  tmpl.image_group = args.has("image-group");
  struct Shortcut {
    const char* option;
    const char* aws;
    const char* gcp;
    const char* azure;
  } shortcuts[] = {{"account", "account_id", "project_id", "subscription_id"},
                   {"region", "region", "zone", nullptr},
                   {"image-id", "image_id", nullptr, nullptr}};
  for (const Shortcut& sc : shortcuts) {
    if (!args.has(sc.option)) continue;
    const char* claim = tmpl.platform == "aws"   ? sc.aws
                        : tmpl.platform == "gcp" ? sc.gcp
                                                 : sc.azure;
    if (claim == nullptr) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("--", sc.option, " has no meaning on ", tmpl.platform,
                                   "; use --require CLAIM=VALUE"));
    }
    tmpl.require[claim] = args.get(sc.option);
  }
  for (const auto& r : args.get_all("require")) {
    auto eq = r.find('=');
    if (eq == std::string::npos || eq == 0) {
      return Status::error(ErrorKind::kInvalidArgument, str_cat("--require '", r, "': use CLAIM=VALUE"));
    }
    tmpl.require[r.substr(0, eq)] = r.substr(eq + 1);
  }
  tmpl.named_policy = args.get("policy");
  KEYGATE_RETURN_IF_ERROR(tmpl.validate());
  return tmpl;
}

int cmd_token_create(const Args& args, const Settings& s) {
  auto ttl = args.get_int("ttl", 3600, 1, 365L * 24 * 3600);
  auto uses = args.get_int("uses", 1, 1, 1000000);
  if (!ttl.is_ok()) return fail(ttl.status());
  if (!uses.is_ok()) return fail(uses.status());
  auto tmpl = template_from_args(args);
  if (!tmpl.is_ok()) return fail(tmpl.status());
  // A token for a policy the server's file does not have would enroll
  // volumes nothing can unlock: checked against the configured file.
  if (!tmpl->named_policy.empty()) {
    if (s.policy_file.empty()) {
      return fail(Status::error(ErrorKind::kInvalidArgument,
                                "--policy names a policy of the policy file: give --policy-file (or policy_file in --config)"));
    }
    auto set = read_policy_file(s.policy_file);
    if (!set.is_ok()) return fail(set.status());
    auto it = set->policies.find(tmpl->named_policy);
    if (it == set->policies.end()) {
      return fail(Status::error(ErrorKind::kInvalidArgument,
                                str_cat("policy '", tmpl->named_policy, "' is not in ", s.policy_file)));
    }
    if (it->second.platform != tmpl->platform) {
      return fail(Status::error(ErrorKind::kInvalidArgument,
                                str_cat("policy '", tmpl->named_policy, "' is for ", it->second.platform,
                                        ", the token for ", tmpl->platform, " (--platform)")));
    }
  }
  auto store = open_store(s);
  if (!store.is_ok()) return fail(store.status());
  SystemClock clock;
  const AuditEvent event{clock.now_unix(), "token.create", "ok", "", "local", to_json(tmpl->to_json())};
  auto token = create_enrollment_token(*store.value(), tmpl.value(), clock.now_unix(), ttl.value(),
                                       static_cast<int>(uses.value()), event);
  if (!token.is_ok()) return fail(token.status().with_context("token not created"));
  std::cout << token.value() << "\n";
  return 0;
}

int cmd_volumes_list(const Args& args, const Settings& s) {
  auto store = open_store(s);
  if (!store.is_ok()) return fail(store.status());
  auto volumes = store.value()->list_volumes();
  if (!volumes.is_ok()) return fail(volumes.status());
  if (args.has("json")) {
    Json::Value out(Json::arrayValue);
    for (const auto& v : volumes.value()) out.append(volume_json(v));
    std::cout << to_pretty_json(out) << "\n";
    return 0;
  }
  printf("%-36s  %-8s  %s\n", "VOLUME", "STATE", "POLICY");
  for (const auto& v : volumes.value()) {
    printf("%-36s  %-8s  %s\n", printable(v.id, 64).c_str(), volume_state_name(v.state),
           printable(v.policy_json, 4096).c_str());
  }
  return 0;
}

int cmd_volumes_revoke_instance(const std::string& id, const std::string& instance, const Settings& s);

int cmd_volumes_revoke(const Args& args, const Settings& s) {
  if (args.positional().size() != 3) {
    return fail(Status::error(ErrorKind::kInvalidArgument, "usage: volumes revoke VOLUME_ID [--instance ID]"));
  }
  const std::string& id = args.positional()[2];
  if (args.has("instance")) return cmd_volumes_revoke_instance(id, args.get("instance"), s);
  auto store = open_store(s);
  if (!store.is_ok()) return fail(store.status());
  SystemClock clock;
  auto record = store.value()->get_volume(id);
  if (!record.is_ok()) return fail(record.status());
  if (record->state == VolumeState::kRevoked) {
    std::cout << "volume " << id << " was already revoked\n";
    return 0;
  }
  // The revocation and its record: one transaction.
  Status st = store.value()->revoke_volume(id, record->state, clock.now_unix(),
                                           AuditEvent{clock.now_unix(), "revoke", "ok", id, "local", ""});
  if (!st.is_ok()) return fail(st);
  std::cout << "volume " << id << " revoked\n";
  return 0;
}

// edit_volume_policy from the server's host ("local"), its result printed.
int edit_policy(const Settings& s, const std::string& id, const char* event, const PolicyChange& change) {
  auto store = open_store(s);
  if (!store.is_ok()) return fail(store.status());
  SystemClock clock;
  auto edit = edit_volume_policy(*store.value(), clock, id, event, "local", "", change);
  if (!edit.is_ok()) return fail(edit.status());
  if (!edit->detail.empty()) std::cout << "volume " << id << ": " << edit->detail << "\n";
  if (!edit->unchanged.empty()) std::cout << "volume " << id << ": " << edit->unchanged << "\n";
  return 0;
}

// edit_policy for a TPM volume's TPM policy.
int edit_tpm_policy(const Settings& s, const std::string& id, const char* event,
                    const std::function<Status(TpmPolicy&, int64_t now, std::string* detail)>& change) {
  return edit_policy(s, id, event, [&](VolumePolicy& policy, int64_t now, PolicyEdit* edit) {
    if (!policy.tpm) {
      return Status::error(ErrorKind::kInvalidArgument, str_cat("volume ", id, " was not enrolled with a TPM"));
    }
    return change(*policy.tpm, now, &edit->detail);
  });
}

// One instance of an image group's volume refused from now on; the group's
// other instances go on unlocking it.
int cmd_volumes_revoke_instance(const std::string& id, const std::string& instance, const Settings& s) {
  return edit_policy(s, id, "revoke.instance", revoke_instance_change(id, instance));
}

int cmd_volumes_accept_next(const Args& args, const Settings& s) {
  if (args.positional().size() != 3) {
    return fail(Status::error(ErrorKind::kInvalidArgument, "usage: volumes accept-next VOLUME_ID [--ttl S]"));
  }
  auto ttl = args.get_int("ttl", 86400, 60, 30L * 86400);
  if (!ttl.is_ok()) return fail(ttl.status());
  return edit_tpm_policy(s, args.positional()[2], "tpm.accept_next_armed",
                         [&](TpmPolicy& t, int64_t now, std::string* detail) {
                           t.accept_next_until = now + ttl.value();
                           *detail = str_cat("the next unlock with other PCR values (within ",
                                             ttl.value(), " s) becomes the new baseline");
                           return Status::ok();
                         });
}

int cmd_volumes_pcr_allow(const Args& args, const Settings& s) {
  const auto& pos = args.positional();
  if (pos.size() < 4) {
    return fail(Status::error(ErrorKind::kInvalidArgument,
                              "usage: volumes pcr-allow VOLUME_ID PCR=HEX [PCR=HEX ...]"));
  }
  return edit_tpm_policy(s, pos[2], "tpm.pcr_allow", [&](TpmPolicy& t, int64_t, std::string* detail) {
    for (size_t i = 3; i < pos.size(); ++i) {
      auto eq = pos[i].find('=');
      auto value = eq == std::string::npos ? Result<Bytes>(Status::error(ErrorKind::kInvalidArgument, ""))
                                           : hex_decode(pos[i].substr(eq + 1));
      const std::string index = eq == std::string::npos ? "" : pos[i].substr(0, eq);
      if (index.empty() || index.size() > 2 || index.find_first_not_of("0123456789") != std::string::npos ||
          !value.is_ok()) {
        return Status::error(ErrorKind::kInvalidArgument, str_cat("'", pos[i], "': use PCR=HEX"));
      }
      auto it = t.pcrs.find(static_cast<uint32_t>(std::stoul(index)));
      if (it == t.pcrs.end()) {
        return Status::error(ErrorKind::kInvalidArgument, str_cat("PCR ", index, " is not in the volume's policy"));
      }
      if (value->size() != it->second.front().size()) {
        return Status::error(ErrorKind::kInvalidArgument,
                             str_cat("PCR ", index, ": a ", t.bank, " value is ", it->second.front().size(), " bytes"));
      }
      if (std::find(it->second.begin(), it->second.end(), value.value()) == it->second.end()) {
        it->second.push_back(value.value());
      }
      *detail += str_cat(detail->empty() ? "allowed " : ", ", "PCR ", index, "=", hex_encode(value.value()));
    }
    return Status::ok();
  });
}

int cmd_audit(const Args& args, const Settings& s) {
  auto limit = args.get_int("limit", 50, 1, 100000);
  if (!limit.is_ok()) return fail(limit.status());
  auto store = open_store(s);
  if (!store.is_ok()) return fail(store.status());
  auto events = store.value()->recent_audit(static_cast<int>(limit.value()));
  if (!events.is_ok()) return fail(events.status());
  for (const auto& e : events.value()) {
    char when[32];
    time_t t = static_cast<time_t>(e.time);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", gmtime(&t));
    // One record, one line: whatever a record holds is escaped for the
    // terminal (a detail can quote what a client sent).
    printf("%s %s %s volume=%s peer=%s %s\n", when, printable(e.event, 64).c_str(),
           printable(e.outcome, 32).c_str(),
           e.volume_id.empty() ? "-" : printable(e.volume_id, 64).c_str(),
           printable(e.peer, 64).c_str(), printable(e.detail, 4096).c_str());
  }
  return 0;
}

constexpr int kExitChainBroken = 3;
constexpr int kAuditPage = 1000;
constexpr size_t kMaxExportLine = (1 << 20) + 1;

// Feeds every stored record, in order, to `each`; stops at its first error.
Status for_each_audit_record(Store& store, const std::function<Status(const AuditRecord&)>& each) {
  int64_t after = 0;
  for (;;) {
    auto page = store.read_audit(after, kAuditPage);
    if (!page.is_ok()) return page.status();
    for (const AuditRecord& r : page.value()) {
      KEYGATE_RETURN_IF_ERROR(each(r));
      after = r.seq;
    }
    if (page->size() < static_cast<size_t>(kAuditPage)) return Status::ok();
  }
}

// Feeds each line of an export to `each`, numbered from 1. A line longer
// than any record's is refused while it is read.
Status for_each_export_record(const std::string& path,
                              const std::function<Status(const AuditRecord&)>& each) {
  FILE* f = fopen(path.c_str(), "re");
  if (f == nullptr) return Status::error(ErrorKind::kIo, str_cat("open ", path, ": ", strerror(errno)));
  std::string line;
  Status status;
  int64_t number = 0;
  auto take = [&]() -> Status {
    ++number;
    auto r = parse_audit_record_json(line);
    line.clear();
    if (!r.is_ok()) {
      return Status::error(ErrorKind::kIntegrity, str_cat(path, " line ", number, ": ", r.status().message()));
    }
    return each(r.value());
  };
  for (int c; status.is_ok() && (c = getc(f)) != EOF;) {
    if (c == '\n') {
      status = take();
    } else if (line.size() >= kMaxExportLine) {
      status = Status::error(ErrorKind::kIntegrity,
                             str_cat(path, " line ", number + 1, ": longer than any record (", kMaxExportLine, " bytes)"));
    } else {
      line.push_back(static_cast<char>(c));
    }
  }
  if (status.is_ok() && ferror(f)) status = Status::error(ErrorKind::kIo, str_cat("read ", path, ": ", strerror(errno)));
  if (status.is_ok() && !line.empty()) {
    status = Status::error(ErrorKind::kIntegrity, str_cat(path, " line ", number + 1, ": cut short (no newline)"));
  }
  fclose(f);
  return status;
}

int chain_result(const Status& s) {
  if (s.kind() == ErrorKind::kIntegrity) {
    log_error(str_cat("audit trail broken: ", s.message()));
    return kExitChainBroken;
  }
  return fail(s);
}

int cmd_audit_verify(const Args& args, const Settings& s) {
  std::optional<AuditHead> expected;
  if (args.has("head")) {
    auto head = parse_audit_head(args.get("head"));
    if (!head.is_ok()) return fail(head.status());
    expected = std::move(head).value();
  }
  AuditChainVerifier verifier(expected);
  auto add = [&](const AuditRecord& r) { return verifier.add(r); };
  Status read;
  if (args.has("file")) {
    read = for_each_export_record(args.get("file"), add);
  } else {
    auto store = open_store(s);
    if (!store.is_ok()) return fail(store.status());
    read = for_each_audit_record(*store.value(), add);
  }
  if (!read.is_ok()) return chain_result(read);
  if (Status done = verifier.finish(); !done.is_ok()) return chain_result(done);
  if (verifier.count() == 0) {
    printf("audit trail intact: empty\n");
  } else {
    printf("audit trail intact: %lld records; head %s\n", static_cast<long long>(verifier.count()),
           format_audit_head(verifier.head()).c_str());
  }
  return 0;
}

// Copies the state folder's SQLite store into an empty PostgreSQL database,
// whole and in one transaction: volumes in every state, tokens, approval
// requests, counted releases, admin certificates and the audit trail as it
// is (its chain verified first, its numbers and hashes kept), then one
// store.migrate record chained on. The copy's chain is verified again from
// PostgreSQL, to the same head. The servers must be stopped meanwhile.
int cmd_migrate_store(const Args& args, const Settings& s) {
  const std::string to = args.get("to");
  if (to.empty()) {
    return fail(
        Status::error(ErrorKind::kInvalidArgument,
                      "usage: keygate-server migrate-store --to CONNINFO [--state-dir DIR]"));
  }
  if (Status ok = check_postgres_conninfo(to); !ok.is_ok()) return fail(ok.with_context("--to"));
  const std::string path = s.state_dir + "/keygate.db";
  if (!s.store.empty() || access((s.state_dir + "/store.conf").c_str(), F_OK) == 0) {
    return fail(Status::error(ErrorKind::kInvalidArgument,
                              str_cat(s.state_dir,
                                      " uses a PostgreSQL store already; migrate-store copies its "
                                      "SQLite store (keygate.db)")));
  }
  if (access(path.c_str(), F_OK) != 0) {
    return fail(Status::error(ErrorKind::kInvalidArgument, str_cat("no SQLite store at ", path)));
  }
  auto dump = dump_sqlite_store(path);
  if (!dump.is_ok()) return fail(dump.status());
  AuditChainVerifier source;
  for (const AuditRecord& r : dump->audit) {
    if (Status added = source.add(r); !added.is_ok()) {
      return chain_result(added.with_context("the SQLite trail, not copied"));
    }
  }
  if (Status done = source.finish(); !done.is_ok())
    return chain_result(done.with_context("the SQLite trail, not copied"));
  int active = 0, pending = 0, revoked = 0;
  for (const VolumeRecord& v : dump->volumes) {
    (v.state == VolumeState::kActive    ? active
     : v.state == VolumeState::kPending ? pending
                                        : revoked)++;
  }
  const std::string head = source.count() > 0 ? format_audit_head(source.head()) : "none";
  SystemClock clock;
  const AuditEvent event{
      clock.now_unix(),
      "store.migrate",
      "ok",
      "",
      "local",
      str_cat("copied from SQLite ", path, ": ", dump->volumes.size(), " volumes (", active,
              " active, ", pending, " pending, ", revoked, " revoked), ", dump->tokens.size(),
              " tokens, ", dump->approvals.size(), " approval requests, ", dump->admin_certs.size(),
              " admin certificates, ", dump->audit.size(), " audit records, head ", head)};
  if (Status loaded = load_postgres_store(to, dump.value(), event); !loaded.is_ok()) {
    return fail(loaded.with_context("copy into PostgreSQL (nothing was written)"));
  }
  // Read back from PostgreSQL: the same records to the same head, then the
  // migration's own.
  auto copy = open_postgres_store(to, 1);
  if (!copy.is_ok()) return fail(copy.status());
  AuditChainVerifier target(source.count() > 0 ? std::optional<AuditHead>(AuditHead{
                                                     source.head().seq, source.head().hash})
                                               : std::nullopt);
  Status read =
      for_each_audit_record(*copy.value(), [&](const AuditRecord& r) { return target.add(r); });
  if (!read.is_ok()) return chain_result(read.with_context("the PostgreSQL copy"));
  if (Status done = target.finish(); !done.is_ok())
    return chain_result(done.with_context("the PostgreSQL copy"));
  printf(
      "copied %zu volumes (%d active, %d pending, %d revoked), %zu tokens, %zu approval requests, "
      "%zu admin "
      "certificates and %zu audit records\n",
      dump->volumes.size(), active, pending, revoked, dump->tokens.size(), dump->approvals.size(),
      dump->admin_certs.size(), dump->audit.size());
  printf(
      "audit trail intact on both sides: SQLite head %s; PostgreSQL head %s (the migration's "
      "record)\n",
      head.c_str(), format_audit_head(target.head()).c_str());
  printf(
      "next: put the connection string in %s/store.conf (or the configuration's \"store\") on "
      "every "
      "replica, then start them\n",
      s.state_dir.c_str());
  return 0;
}

// Every record as stored, checked on the way: a broken chain is still
// exported whole (it is the evidence), and said (exit 3).
int cmd_audit_export(const Args& args, const Settings& s) {
  auto store = open_store(s);
  if (!store.is_ok()) return fail(store.status());
  const bool to_file = args.has("output");
  AtomicFileWriter file;
  if (to_file) {
    if (Status opened = file.open(args.get("output"), 0600); !opened.is_ok()) return fail(opened);
  }
  AuditChainVerifier verifier;
  int64_t exported = 0;
  AuditRecord last;
  Status written = for_each_audit_record(*store.value(), [&](const AuditRecord& r) -> Status {
    (void)verifier.add(r);
    ++exported;
    last = r;
    const std::string line = audit_record_json(r) + "\n";
    if (to_file) return file.append(line);
    if (fwrite(line.data(), 1, line.size(), stdout) != line.size()) {
      return Status::error(ErrorKind::kIo, str_cat("write standard output: ", strerror(errno)));
    }
    return Status::ok();
  });
  if (written.is_ok() && !to_file && fflush(stdout) != 0) {
    written = Status::error(ErrorKind::kIo, str_cat("write standard output: ", strerror(errno)));
  }
  if (written.is_ok() && to_file) written = file.commit();
  if (!written.is_ok()) return fail(written);
  fprintf(stderr, "exported %lld records%s%s\n", static_cast<long long>(exported),
          exported > 0 ? "; last " : "", exported > 0 ? format_audit_head(last).c_str() : "");
  if (Status chain = verifier.finish(); !chain.is_ok()) return chain_result(chain);
  return 0;
}

int cmd_policy_check(const Args& args, const Settings& s) {
  if (args.positional().size() > 3) return fail(Status::error(ErrorKind::kInvalidArgument, "usage: policy check [FILE]"));
  const std::string file = args.positional().size() == 3 ? args.positional()[2] : s.policy_file;
  if (file.empty()) {
    return fail(Status::error(ErrorKind::kInvalidArgument, "policy check: give FILE, --policy-file or policy_file in --config"));
  }
  auto set = read_policy_file(file);
  if (!set.is_ok()) return fail(set.status());
  printf("%s: %zu policies, sha256 %s\n", printable(file, 256).c_str(), set->policies.size(), set->sha256.c_str());
  for (const auto& [name, p] : set->policies) {
    printf("  %s (line %d): %s, approval %s\n", name.c_str(), p.line, p.platform.c_str(), p.approval.c_str());
  }
  return 0;
}

int cmd_ca(const Settings& s) {
  auto ca = read_small_file(s.state_dir + "/ca.pem", 64 * 1024);
  if (!ca.is_ok()) return fail(ca.status().with_context("start the server once to create it"));
  auto fp = certificate_sha256_fingerprint(ca.value());
  if (!fp.is_ok()) return fail(fp.status());
  std::cout << ca.value();
  std::cerr << "sha256:" << fp.value() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  disable_core_dumps();
  std::vector<std::string> argv_list(argv + 1, argv + argc);
  auto args = Args::parse(argv_list, kValueOptions, kFlagOptions);
  log_init("keygate-server", LogSink::kStderr, LogLevel::kInfo);
  // Before any key exists: the TLS key and every handshake's live there.
  if (Status heap = init_openssl_secure_heap(kSecureHeapServer); !heap.is_ok()) {
    log_error(heap.message());
    return 1;
  }
  if (!args.is_ok()) {
    log_error(args.status().message());
    fputs(kUsage, stderr);
    return 2;
  }
  const auto& pos = args->positional();
  if (args->has("help") || pos.empty()) {
    fputs(kUsage, args->has("help") ? stdout : stderr);
    return args->has("help") ? 0 : 2;
  }
  std::string level = args->get("log-level", "info");
  LogLevel min = level == "debug"     ? LogLevel::kDebug
                 : level == "warning" ? LogLevel::kWarning
                 : level == "error"   ? LogLevel::kError
                                      : LogLevel::kInfo;
  log_init("keygate-server", LogSink::kStderr, min);
  auto settings = load_settings(args.value());
  if (!settings.is_ok()) return fail(settings.status());

  const std::string& cmd = pos[0];
  const std::string sub = pos.size() > 1 ? pos[1] : "";
  if (cmd == "serve" && pos.size() == 1) return cmd_serve(args.value(), settings.value());
  if (cmd == "token" && sub == "create") return cmd_token_create(args.value(), settings.value());
  if (cmd == "volumes" && sub == "list") return cmd_volumes_list(args.value(), settings.value());
  if (cmd == "volumes" && sub == "revoke") {
    return cmd_volumes_revoke(args.value(), settings.value());
  }
  if (cmd == "volumes" && sub == "accept-next") {
    return cmd_volumes_accept_next(args.value(), settings.value());
  }
  if (cmd == "volumes" && sub == "pcr-allow") {
    return cmd_volumes_pcr_allow(args.value(), settings.value());
  }
  if (cmd == "audit" && pos.size() == 1) return cmd_audit(args.value(), settings.value());
  if (cmd == "audit" && sub == "verify" && pos.size() == 2) {
    return cmd_audit_verify(args.value(), settings.value());
  }
  if (cmd == "audit" && sub == "export" && pos.size() == 2) {
    return cmd_audit_export(args.value(), settings.value());
  }
  if (cmd == "ca" && pos.size() == 1) return cmd_ca(settings.value());
  if (cmd == "migrate-store" && pos.size() == 1)
    return cmd_migrate_store(args.value(), settings.value());
  if (cmd == "policy" && sub == "check") return cmd_policy_check(args.value(), settings.value());
  if (cmd == "admin") return admin_command(args.value(), settings.value(), template_from_args(args.value()));
  log_error(str_cat("unknown command '", cmd, sub.empty() ? "" : " ", sub, "'"));
  fputs(kUsage, stderr);
  return 2;
}
