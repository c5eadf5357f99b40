// keygate-metadata-emulator: a cloud metadata service for tests and the
// quickstart, where the real one cannot be reached. One process plays one
// platform, on loopback, with the provider's paths, headers and formats:
//
//   aws    IMDSv2: session token, identity document in AWS's layout, its
//          rsa2048 CMS signature from per-region test certificates
//          (trusted by keygate-server only via --aws-trust-dir STATE/aws-trust)
//   gcp    the metadata server's identity token, an RS256 JWT in Google's
//          format=full layout, signed with a test key published as a JWK
//          set (--gcp-jwks STATE/gcp-trust/jwks.json)
//   azure  IMDS's attested document, a CMS signature by a test
//          "metadata.azure.com" certificate under a test root and
//          intermediate (--azure-trust-dir STATE/azure-trust)
#include <httplib.h>
#include <openssl/cms.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <signal.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>

#include "core/args.h"
#include "core/crypto.h"
#include "core/file.h"
#include "core/json.h"
#include "core/log.h"
#include "emulator/pki.h"

using namespace keygate;
using namespace keygate::emulator;

namespace {

constexpr char kUsage[] = R"(usage: keygate-metadata-emulator COMMAND [options]

Commands:
  init     create the test signing keys and certificates of every platform
           (AWS: one per --region, repeatable)
  serve    serve one instance's metadata for --platform

Options:
  --state-dir DIR          keys and trust material live here
  --platform NAME          aws (default), gcp or azure
  --listen HOST:PORT       (serve) default 127.0.0.1:18080; port 0: any free port
  --port-file FILE         (serve) write the bound port here
  --clock-offset SECONDS   (serve) sign with this offset from the real time
                           (negative: stale tokens and documents)
  --instance-id ID         AWS default i-0123456789abcdef0,
                           GCP default 4567890123456789012
aws:
  --account ID             default 123456789012
  --region NAME            default us-east-1 (init: repeatable)
  --availability-zone AZ   default <region>a
  --image-id AMI           default ami-0abcdef1234567890
  --instance-type TYPE     default t3.micro
  --architecture ARCH      default x86_64
  --private-ip ADDR        default 10.0.0.10
gcp:
  --project-id ID          default keygate-test-project
  --project-number N       default 123456789012
  --zone ZONE              default us-central1-a
  --instance-name NAME     default keygate-test-1
azure:
  --subscription-id ID     default 5f130ffc-0a3e-4795-b691-4f56a12a5547
  --vm-id ID               default 9c0c5e9c-5a3b-4b8f-9d7e-2f1d3c4b5a69
  --sku SKU                default 22_04-lts-gen2
  --plan-name, --plan-product, --plan-publisher   default empty
)";

std::string json_quote(const std::string& s) { return to_json(Json::Value(s)); }

// The emulator's notion of now (checked in main()).
int64_t now_with_offset(const Args& args) {
  auto offset = args.get_int("clock-offset", 0, -86400 * 365, 86400 * 365);
  return static_cast<int64_t>(time(nullptr)) + (offset.is_ok() ? offset.value() : 0);
}

std::string format_time(int64_t t, const char* fmt) {
  time_t tt = static_cast<time_t>(t);
  struct tm tm{};
  gmtime_r(&tt, &tm);
  char buf[64];
  strftime(buf, sizeof(buf), fmt, &tm);
  return buf;
}

void reply(httplib::Response& res, int status, const std::string& body, const char* type) {
  res.status = status;
  res.set_content(body, type);
}

// ---------------------------------------------------------------- AWS ----

bool is_region_name(const std::string& r) {
  if (r.empty() || r.size() > 32) return false;
  for (char c : r) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) return false;
  }
  return true;
}

Result<Signer> aws_region_signer(const std::string& state, const std::string& region) {
  if (!is_region_name(region)) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("bad region name '", region, "'"));
  }
  CertSpec spec;
  spec.subject = {{"C", "US"}, {"O", "keygate test metadata emulator"},
                  {"CN", "instance identity " + region}};
  return load_or_create_signer(state + "/aws-keys/" + region + ".key",
                               state + "/aws-trust/" + region + ".pem", spec, nullptr);
}

// AWS's exact layout: two-space indent, " : " separators, fixed key order.
std::string aws_identity_document(const Args& a, int64_t now) {
  const std::string region = a.get("region", "us-east-1");
  std::string d = "{\n";
  auto field = [&d](const char* key, const std::string& value, bool last = false) {
    d += str_cat("  \"", key, "\" : ", value, last ? "\n" : ",\n");
  };
  field("accountId", json_quote(a.get("account", "123456789012")));
  field("architecture", json_quote(a.get("architecture", "x86_64")));
  field("availabilityZone", json_quote(a.get("availability-zone", region + "a")));
  field("billingProducts", "null");
  field("devpayProductCodes", "null");
  field("marketplaceProductCodes", "null");
  field("imageId", json_quote(a.get("image-id", "ami-0abcdef1234567890")));
  field("instanceId", json_quote(a.get("instance-id", "i-0123456789abcdef0")));
  field("instanceType", json_quote(a.get("instance-type", "t3.micro")));
  field("kernelId", "null");
  field("pendingTime", json_quote(format_time(now, "%Y-%m-%dT%H:%M:%SZ")));
  field("privateIp", json_quote(a.get("private-ip", "10.0.0.10")));
  field("ramdiskId", "null");
  field("region", json_quote(region));
  field("version", json_quote("2017-09-30"), true);
  return d + "}";
}

class TokenTable {
 public:
  std::string issue(int ttl) {
    Bytes raw = random_bytes(42);
    std::string token = base64_encode(raw);
    std::lock_guard<std::mutex> lock(mu_);
    tokens_[token] = std::chrono::steady_clock::now() + std::chrono::seconds(ttl);
    return token;
  }
  bool valid(const std::string& token) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = tokens_.find(token);
    return it != tokens_.end() && std::chrono::steady_clock::now() < it->second;
  }

 private:
  std::mutex mu_;
  std::map<std::string, std::chrono::steady_clock::time_point> tokens_;
};

Status serve_aws(httplib::Server& srv, const Args& args, const std::string& state) {
  auto signer = aws_region_signer(state, args.get("region", "us-east-1"));
  if (!signer.is_ok()) return signer.status();
  const std::string document = aws_identity_document(args, now_with_offset(args));
  auto der = cms_sign(signer.value(), document, CMS_NOCERTS);
  if (!der.is_ok()) return der.status();
  std::string b64 = base64_encode(der.value()), rsa2048;
  for (size_t i = 0; i < b64.size(); i += 64) rsa2048 += (i ? "\n" : "") + b64.substr(i, 64);

  auto tokens = std::make_shared<TokenTable>();
  srv.Put("/latest/api/token", [tokens](const httplib::Request& req, httplib::Response& res) {
    if (req.has_header("X-Forwarded-For")) return reply(res, 403, "Forbidden", "text/plain");
    std::string ttl_text = req.get_header_value("X-aws-ec2-metadata-token-ttl-seconds");
    int ttl = atoi(ttl_text.c_str());
    if (ttl_text.empty() || ttl < 1 || ttl > 21600) {
      return reply(res, 400, "Bad Request", "text/plain");
    }
    res.set_header("X-aws-ec2-metadata-token-ttl-seconds", std::to_string(ttl));
    reply(res, 200, tokens->issue(ttl), "text/plain");
  });
  const std::string region = args.get("region", "us-east-1");
  auto paths = std::make_shared<std::map<std::string, std::string>>(std::map<std::string, std::string>{
      {"/latest/dynamic/instance-identity/document", document},
      {"/latest/dynamic/instance-identity/rsa2048", rsa2048},
      {"/latest/meta-data/instance-id", args.get("instance-id", "i-0123456789abcdef0")},
      {"/latest/meta-data/ami-id", args.get("image-id", "ami-0abcdef1234567890")},
      {"/latest/meta-data/instance-type", args.get("instance-type", "t3.micro")},
      {"/latest/meta-data/placement/region", region},
      {"/latest/meta-data/placement/availability-zone", args.get("availability-zone", region + "a")},
  });
  srv.Get("/latest/.*", [tokens, paths](const httplib::Request& req, httplib::Response& res) {
    // IMDSv2 required: a GET without a valid session token is 401.
    if (!tokens->valid(req.get_header_value("X-aws-ec2-metadata-token"))) {
      return reply(res, 401, "Unauthorized", "text/plain");
    }
    auto it = paths->find(req.path);
    if (it == paths->end()) return reply(res, 404, "Not Found", "text/plain");
    reply(res, 200, it->second, "text/plain");
  });
  log_info(str_cat("AWS IMDSv2 for ", args.get("instance-id", "i-0123456789abcdef0"), " (account ",
                   args.get("account", "123456789012"), ", ", region, ")"));
  return Status::ok();
}

// ---------------------------------------------------------------- GCP ----

struct GcpKey {
  Signer signer;
  std::string kid;
};

Result<GcpKey> gcp_key(const std::string& state) {
  CertSpec spec;
  spec.subject = {{"CN", "keygate test Google identity signer"}};
  auto signer = load_or_create_signer(state + "/gcp-keys/google.key",
                                      state + "/gcp-keys/google.pem", spec, nullptr);
  if (!signer.is_ok()) return signer.status();
  BIGNUM *n = nullptr, *e = nullptr;
  EVP_PKEY_get_bn_param(signer->key, OSSL_PKEY_PARAM_RSA_N, &n);
  EVP_PKEY_get_bn_param(signer->key, OSSL_PKEY_PARAM_RSA_E, &e);
  Bytes nb(BN_num_bytes(n)), eb(BN_num_bytes(e));
  BN_bn2bin(n, nb.data());
  BN_bn2bin(e, eb.data());
  BN_free(n);
  BN_free(e);
  GcpKey key;
  // Google's key ids are 40 hex characters.
  key.kid = hex_encode(sha256(as_string_view(nb))).substr(0, 40);
  Json::Value jwk;
  jwk["kty"] = "RSA";
  jwk["alg"] = "RS256";
  jwk["use"] = "sig";
  jwk["kid"] = key.kid;
  jwk["n"] = base64url_encode(nb.data(), nb.size());
  jwk["e"] = base64url_encode(eb.data(), eb.size());
  Json::Value jwks;
  jwks["keys"].append(jwk);
  mkdir((state + "/gcp-trust").c_str(), 0755);
  KEYGATE_RETURN_IF_ERROR(write_file_atomically(state + "/gcp-trust/jwks.json",
                                                to_pretty_json(jwks) + "\n", 0644));
  key.signer = std::move(signer).value();
  return key;
}

Status serve_gcp(httplib::Server& srv, const Args& args, const std::string& state) {
  auto key = gcp_key(state);
  if (!key.is_ok()) return key.status();
  auto shared_key = std::make_shared<GcpKey>(std::move(key).value());
  auto number = args.get_int("project-number", 123456789012, 1, INT64_MAX);
  if (!number.is_ok()) return number.status();
  struct Instance {
    std::string project_id, zone, instance_id, instance_name;
    int64_t project_number;
    int64_t created;
  };
  auto inst = std::make_shared<Instance>(Instance{
      args.get("project-id", "keygate-test-project"), args.get("zone", "us-central1-a"),
      args.get("instance-id", "4567890123456789012"), args.get("instance-name", "keygate-test-1"),
      number.value(), now_with_offset(args) - 120});
  const int64_t offset = now_with_offset(args) - static_cast<int64_t>(time(nullptr));

  auto metadata = [](const httplib::Request& req, httplib::Response& res) {
    // Google's metadata server: the flavor header is required, and requests
    // forwarded by a proxy are refused.
    res.set_header("Metadata-Flavor", "Google");
    if (req.has_header("X-Forwarded-For")) {
      reply(res, 403, "Forbidden\n", "text/html");
      return false;
    }
    if (req.get_header_value("Metadata-Flavor") != "Google") {
      reply(res, 403,
            "Your client does not have permission to get URL from this server. Missing "
            "Metadata-Flavor:Google header.\n",
            "text/html");
      return false;
    }
    return true;
  };
  srv.Get("/computeMetadata/v1/instance/service-accounts/default/identity",
          [metadata, shared_key, inst, offset](const httplib::Request& req, httplib::Response& res) {
            if (!metadata(req, res)) return;
            const std::string audience = req.get_param_value("audience");
            if (audience.empty()) {
              return reply(res, 400, "non-empty audience parameter required\n", "text/plain");
            }
            const std::string format = req.has_param("format") ? req.get_param_value("format") : "standard";
            if (format != "standard" && format != "full") {
              return reply(res, 400, "format must be standard or full\n", "text/plain");
            }
            const int64_t now = static_cast<int64_t>(time(nullptr)) + offset;
            Json::Value header;
            header["alg"] = "RS256";
            header["kid"] = shared_key->kid;
            header["typ"] = "JWT";
            Json::Value p;
            p["aud"] = audience;
            p["azp"] = "104070955682298736149";
            p["email"] = "123456789012-compute@developer.gserviceaccount.com";
            p["email_verified"] = true;
            p["exp"] = static_cast<Json::Int64>(now + 3600);
            p["iat"] = static_cast<Json::Int64>(now);
            p["iss"] = "https://accounts.google.com";
            p["sub"] = "104070955682298736149";
            if (format == "full") {
              Json::Value& ce = p["google"]["compute_engine"];
              ce["instance_creation_timestamp"] = static_cast<Json::Int64>(inst->created);
              ce["instance_id"] = inst->instance_id;
              ce["instance_name"] = inst->instance_name;
              ce["project_id"] = inst->project_id;
              ce["project_number"] = static_cast<Json::Int64>(inst->project_number);
              ce["zone"] = inst->zone;
              if (req.get_param_value("licenses") == "TRUE") {
                ce["license_id"].append("5731035067256925298");
              }
            }
            const std::string h = to_json(header), b = to_json(p);
            std::string signing_input = base64url_encode(reinterpret_cast<const uint8_t*>(h.data()), h.size()) +
                                        "." +
                                        base64url_encode(reinterpret_cast<const uint8_t*>(b.data()), b.size());
            auto sig = rs256_sign(shared_key->signer.key, signing_input);
            if (!sig.is_ok()) return reply(res, 500, "signing failed\n", "text/plain");
            reply(res, 200, signing_input + "." + base64url_encode(sig->data(), sig->size()),
                  "text/html");
          });
  auto paths = std::make_shared<std::map<std::string, std::string>>(std::map<std::string, std::string>{
      {"/computeMetadata/v1/instance/id", inst->instance_id},
      {"/computeMetadata/v1/instance/name", inst->instance_name},
      {"/computeMetadata/v1/instance/zone",
       str_cat("projects/", inst->project_number, "/zones/", inst->zone)},
      {"/computeMetadata/v1/project/project-id", inst->project_id},
      {"/computeMetadata/v1/project/numeric-project-id", std::to_string(inst->project_number)},
  });
  srv.Get("/computeMetadata/.*", [metadata, paths](const httplib::Request& req, httplib::Response& res) {
    if (!metadata(req, res)) return;
    auto it = paths->find(req.path);
    if (it == paths->end()) return reply(res, 404, "Not Found\n", "text/html");
    reply(res, 200, it->second, "application/text");
  });
  log_info(str_cat("GCP metadata server for instance ", inst->instance_id, " (project ",
                   inst->project_id, ", ", inst->zone, ")"));
  return Status::ok();
}

// -------------------------------------------------------------- Azure ----

Result<Signer> azure_signer(const std::string& state) {
  CertSpec root_spec;
  root_spec.subject = {{"C", "US"}, {"O", "keygate test"}, {"CN", "keygate test Azure root"}};
  root_spec.ca = true;
  auto root = load_or_create_signer(state + "/azure-keys/root.key", state + "/azure-trust/root.pem",
                                    root_spec, nullptr);
  if (!root.is_ok()) return root.status();
  CertSpec mid_spec;
  mid_spec.subject = {{"C", "US"}, {"O", "keygate test"}, {"CN", "keygate test Azure TLS CA"}};
  mid_spec.ca = true;
  auto mid = load_or_create_signer(state + "/azure-keys/intermediate.key",
                                   state + "/azure-trust/intermediate.pem", mid_spec, &root.value());
  if (!mid.is_ok()) return mid.status();
  CertSpec leaf_spec;
  leaf_spec.subject = {{"CN", "metadata.azure.com"}};
  leaf_spec.dns_names = {"eastus.metadata.azure.com"};
  leaf_spec.tls_usage = true;
  return load_or_create_signer(state + "/azure-keys/leaf.key", state + "/azure-keys/leaf.pem",
                               leaf_spec, &mid.value());
}

bool is_azure_nonce(const std::string& n) {
  if (n.empty() || n.size() > 32) return false;
  for (char c : n) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '-')) {
      return false;
    }
  }
  return true;
}

Status serve_azure(httplib::Server& srv, const Args& args, const std::string& state) {
  auto signer = azure_signer(state);
  if (!signer.is_ok()) return signer.status();
  auto shared_signer = std::make_shared<Signer>(std::move(signer).value());
  struct Instance {
    std::string subscription_id, vm_id, sku, plan_name, plan_product, plan_publisher;
  };
  auto inst = std::make_shared<Instance>(Instance{
      args.get("subscription-id", "5f130ffc-0a3e-4795-b691-4f56a12a5547"),
      args.get("vm-id", "9c0c5e9c-5a3b-4b8f-9d7e-2f1d3c4b5a69"), args.get("sku", "22_04-lts-gen2"),
      args.get("plan-name"), args.get("plan-product"), args.get("plan-publisher")});
  const int64_t offset = now_with_offset(args) - static_cast<int64_t>(time(nullptr));
  auto error = [](httplib::Response& res, int status, const std::string& message) {
    Json::Value e;
    e["error"] = message;
    reply(res, status, to_json(e), "application/json; charset=utf-8");
  };
  // Azure IMDS: "Metadata: true" and an api-version are required; proxied
  // requests are refused.
  auto metadata = [error](const httplib::Request& req, httplib::Response& res) {
    if (req.has_header("X-Forwarded-For")) {
      error(res, 400, "Bad request. Requests with X-Forwarded-For header are not allowed");
      return false;
    }
    if (req.get_header_value("Metadata") != "true") {
      error(res, 400, "Bad request. Required metadata header not specified");
      return false;
    }
    if (req.get_param_value("api-version").empty()) {
      error(res, 400, "Bad request. api-version was not specified in the request");
      return false;
    }
    return true;
  };
  srv.Get("/metadata/attested/document", [metadata, error, shared_signer, inst, offset](
                                             const httplib::Request& req, httplib::Response& res) {
    if (!metadata(req, res)) return;
    const int64_t now = static_cast<int64_t>(time(nullptr)) + offset;
    std::string nonce = req.get_param_value("nonce");
    if (!req.has_param("nonce")) {
      nonce = format_time(now, "%Y%m%d-%H%M%S");
    } else if (!is_azure_nonce(nonce)) {
      return error(res, 400, "Bad request. nonce must be up to 32 alphanumeric characters");
    }
    // Azure's layout and key order, compact.
    std::string d = "{\"licenseType\":\"\",\"nonce\":" + json_quote(nonce) +
                    ",\"plan\":{\"name\":" + json_quote(inst->plan_name) +
                    ",\"product\":" + json_quote(inst->plan_product) +
                    ",\"publisher\":" + json_quote(inst->plan_publisher) +
                    "},\"sku\":" + json_quote(inst->sku) +
                    ",\"subscriptionId\":" + json_quote(inst->subscription_id) +
                    ",\"timeStamp\":{\"createdOn\":" +
                    json_quote(format_time(now, "%m/%d/%y %H:%M:%S -0000")) +
                    ",\"expiresOn\":" + json_quote(format_time(now + 6 * 3600, "%m/%d/%y %H:%M:%S -0000")) +
                    "},\"vmId\":" + json_quote(inst->vm_id) + "}";
    // Signed without attributes, the signer's certificate embedded.
    auto der = cms_sign(*shared_signer, d, CMS_NOATTR);
    if (!der.is_ok()) return error(res, 500, "signing failed");
    reply(res, 200, "{\"encoding\":\"pkcs7\",\"signature\":" + json_quote(base64_encode(der.value())) + "}",
          "application/json; charset=utf-8");
  });
  srv.Get("/metadata/instance/compute/vmId", [metadata, inst](const httplib::Request& req,
                                                              httplib::Response& res) {
    if (!metadata(req, res)) return;
    reply(res, 200, inst->vm_id, "text/plain; charset=utf-8");
  });
  log_info(str_cat("Azure IMDS for VM ", inst->vm_id, " (subscription ", inst->subscription_id, ")"));
  return Status::ok();
}

int serve(const Args& args, const std::string& state) {
  const std::string platform = args.get("platform", "aws");
  httplib::Server srv;
  srv.set_tcp_nodelay(true);
  Status ready = platform == "aws"     ? serve_aws(srv, args, state)
                 : platform == "gcp"   ? serve_gcp(srv, args, state)
                 : platform == "azure" ? serve_azure(srv, args, state)
                                       : Status::error(ErrorKind::kInvalidArgument,
                                                       str_cat("unknown platform '", platform, "'"));
  if (!ready.is_ok()) {
    log_error(ready.message());
    return ready.kind() == ErrorKind::kInvalidArgument ? 2 : 1;
  }
  // Anything else is not found, the way every provider answers.
  srv.set_error_handler([](const httplib::Request&, httplib::Response& res) {
    if (res.body.empty()) res.set_content("Not Found", "text/plain");
  });
  std::string listen = args.get("listen", "127.0.0.1:18080");
  auto colon = listen.rfind(':');
  std::string host = listen.substr(0, colon);
  int port = colon == std::string::npos ? 0 : atoi(listen.c_str() + colon + 1);
  if (port == 0) {
    port = srv.bind_to_any_port(host);
  } else if (!srv.bind_to_port(host, port)) {
    port = -1;
  }
  if (port <= 0) {
    log_error(str_cat("cannot bind ", listen));
    return 1;
  }
  if (args.has("port-file")) {
    Status s = write_file_atomically(args.get("port-file"), std::to_string(port) + "\n", 0644);
    if (!s.is_ok()) {
      log_error(s.message());
      return 1;
    }
  }
  log_info(str_cat(platform, " metadata on http://", host, ":", port));
  srv.listen_after_bind();
  return 0;
}

int init(const Args& args, const std::string& state) {
  auto regions = args.get_all("region");
  if (regions.empty()) regions.push_back("us-east-1");
  for (const auto& region : regions) {
    auto s = aws_region_signer(state, region);
    if (!s.is_ok()) {
      log_error(s.status().message());
      return 1;
    }
  }
  auto g = gcp_key(state);
  auto a = azure_signer(state);
  for (const Status* s : {&g.status(), &a.status()}) {
    if (!s->is_ok()) {
      log_error(s->message());
      return 1;
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  log_init("keygate-metadata-emulator", LogSink::kStderr, LogLevel::kInfo);
  signal(SIGPIPE, SIG_IGN);
  std::vector<std::string> argv_list(argv + 1, argv + argc);
  auto args = Args::parse(
      argv_list,
      {"state-dir", "platform", "listen", "port-file", "clock-offset", "account", "region",
       "availability-zone", "instance-id", "image-id", "instance-type", "architecture",
       "private-ip", "project-id", "project-number", "zone", "instance-name", "subscription-id",
       "vm-id", "sku", "plan-name", "plan-product", "plan-publisher"},
      {"help"});
  if (!args.is_ok() || args->positional().size() != 1 || !args->has("state-dir")) {
    if (!args.is_ok()) log_error(args.status().message());
    fputs(kUsage, stderr);
    return 2;
  }
  if (!args->get_int("clock-offset", 0, -86400 * 365, 86400 * 365).is_ok()) {
    log_error("--clock-offset: seconds within a year");
    return 2;
  }
  const std::string state = args->get("state-dir");
  Status made = ensure_state_dir(state);
  if (!made.is_ok()) {
    log_error(made.message());
    return 1;
  }
  if (args->positional()[0] == "init") return init(args.value(), state);
  if (args->positional()[0] == "serve") return serve(args.value(), state);
  fputs(kUsage, stderr);
  return 2;
}
