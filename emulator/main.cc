// keygate-metadata-emulator: a cloud metadata service for tests and the
// quickstart, where the real one cannot be reached. It serves AWS IMDSv2 on
// loopback with AWS's paths, headers, token flow and document layout, and
// signs identity documents (CMS, RSA-2048 + SHA-256, like AWS's rsa2048
// flavour) with per-region test certificates it generates. keygate-server
// trusts those only when given `--aws-trust-dir <state>/aws-trust`.
#include <httplib.h>
#include <openssl/bio.h>
#include <openssl/cms.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
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
#include "core/log.h"
#include "server/state_files.h"

using namespace keygate;

namespace {

constexpr char kUsage[] = R"(usage: keygate-metadata-emulator COMMAND [options]

Commands:
  init     create test signing certificates for --region (repeatable)
  serve    serve IMDSv2 for one instance identity

Options:
  --state-dir DIR          keys in DIR/aws-keys, certificates in DIR/aws-trust
  --listen HOST:PORT       (serve) default 127.0.0.1:18080; port 0: any free port
  --port-file FILE         (serve) write the bound port here
  --account ID             default 123456789012
  --region NAME            default us-east-1 (init: repeatable)
  --availability-zone AZ   default <region>a
  --instance-id ID         default i-0123456789abcdef0
  --image-id AMI           default ami-0abcdef1234567890
  --instance-type TYPE     default t3.micro
  --architecture ARCH      default x86_64
  --private-ip ADDR        default 10.0.0.10
)";

struct Identity {
  std::string account, region, az, instance_id, image_id, instance_type, architecture, private_ip,
      pending_time;
};

std::string json_quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  return out + "\"";
}

// AWS's exact layout: two-space indent, " : " separators, fixed key order.
std::string identity_document(const Identity& id) {
  std::string d = "{\n";
  auto field = [&d](const char* key, const std::string& value, bool last = false) {
    d += str_cat("  \"", key, "\" : ", value, last ? "\n" : ",\n");
  };
  field("accountId", json_quote(id.account));
  field("architecture", json_quote(id.architecture));
  field("availabilityZone", json_quote(id.az));
  field("billingProducts", "null");
  field("devpayProductCodes", "null");
  field("marketplaceProductCodes", "null");
  field("imageId", json_quote(id.image_id));
  field("instanceId", json_quote(id.instance_id));
  field("instanceType", json_quote(id.instance_type));
  field("kernelId", "null");
  field("pendingTime", json_quote(id.pending_time));
  field("privateIp", json_quote(id.private_ip));
  field("ramdiskId", "null");
  field("region", json_quote(id.region));
  field("version", json_quote("2017-09-30"), true);
  return d + "}";
}

struct Signer {
  Signer() = default;
  Signer(const Signer&) = delete;
  Signer& operator=(const Signer&) = delete;
  Signer(Signer&& o) noexcept : key(o.key), cert(o.cert) {
    o.key = nullptr;
    o.cert = nullptr;
  }
  ~Signer() {
    EVP_PKEY_free(key);
    X509_free(cert);
  }
  EVP_PKEY* key = nullptr;
  X509* cert = nullptr;
};

// Region names become file names: AWS's alphabet only.
bool is_region_name(const std::string& r) {
  if (r.empty() || r.size() > 32) return false;
  for (char c : r) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) return false;
  }
  return true;
}

// Loads or creates the self-signed RSA-2048 certificate for `region`.
Result<Signer> region_signer(const std::string& state_dir, const std::string& region) {
  if (!is_region_name(region)) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("bad region name '", region, "'"));
  }
  const std::string key_dir = state_dir + "/aws-keys", trust_dir = state_dir + "/aws-trust";
  KEYGATE_RETURN_IF_ERROR(server::ensure_state_dir(state_dir));
  KEYGATE_RETURN_IF_ERROR(server::ensure_state_dir(key_dir));
  mkdir(trust_dir.c_str(), 0755);
  const std::string key_path = key_dir + "/" + region + ".key";
  const std::string cert_path = trust_dir + "/" + region + ".pem";
  Signer s;
  if (FILE* kf = fopen(key_path.c_str(), "r")) {
    s.key = PEM_read_PrivateKey(kf, nullptr, nullptr, nullptr);
    fclose(kf);
    if (FILE* cf = fopen(cert_path.c_str(), "r")) {
      s.cert = PEM_read_X509(cf, nullptr, nullptr, nullptr);
      fclose(cf);
    }
    if (s.key && s.cert) return s;
    return Status::error(ErrorKind::kIo, str_cat("unreadable test signer for ", region));
  }
  s.key = EVP_RSA_gen(2048);
  s.cert = X509_new();
  X509_set_version(s.cert, 2);
  Bytes serial = random_bytes(8);
  serial[0] &= 0x7f;
  BIGNUM* bn = BN_bin2bn(serial.data(), static_cast<int>(serial.size()), nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(s.cert));
  BN_free(bn);
  X509_gmtime_adj(X509_getm_notBefore(s.cert), -86400);
  X509_gmtime_adj(X509_getm_notAfter(s.cert), 3650L * 86400);
  X509_set_pubkey(s.cert, s.key);
  X509_NAME* name = X509_get_subject_name(s.cert);
  auto add = [name](const char* field, const std::string& v) {
    X509_NAME_add_entry_by_txt(name, field, MBSTRING_ASC,
                               reinterpret_cast<const unsigned char*>(v.c_str()), -1, -1, 0);
  };
  add("C", "US");
  add("O", "keygate test metadata emulator");
  add("CN", "instance identity " + region);
  X509_set_issuer_name(s.cert, name);
  X509_sign(s.cert, s.key, EVP_sha256());
  BIO* kb = BIO_new(BIO_s_mem());
  PEM_write_bio_PrivateKey(kb, s.key, nullptr, nullptr, 0, nullptr, nullptr);
  char* data = nullptr;
  long len = BIO_get_mem_data(kb, &data);
  Status ks = write_file_atomically(key_path, std::string_view(data, len), 0600);
  BIO_free(kb);
  KEYGATE_RETURN_IF_ERROR(ks);
  BIO* cb = BIO_new(BIO_s_mem());
  PEM_write_bio_X509(cb, s.cert);
  len = BIO_get_mem_data(cb, &data);
  Status cs = write_file_atomically(cert_path, std::string_view(data, len), 0644);
  BIO_free(cb);
  KEYGATE_RETURN_IF_ERROR(cs);
  return s;
}

// CMS SignedData over the document, content embedded, no certificates,
// signed attributes (content type, signing time, digest), SHA-256.
Result<std::string> sign_document(const Signer& signer, const std::string& document) {
  BIO* in = BIO_new_mem_buf(document.data(), static_cast<int>(document.size()));
  CMS_ContentInfo* cms = CMS_sign(signer.cert, signer.key, nullptr, in,
                                  CMS_BINARY | CMS_NOCERTS | CMS_NOSMIMECAP);
  BIO_free(in);
  if (cms == nullptr) return Status::error(ErrorKind::kInternal, "CMS_sign failed");
  BIO* out = BIO_new(BIO_s_mem());
  i2d_CMS_bio(out, cms);
  CMS_ContentInfo_free(cms);
  char* data = nullptr;
  long len = BIO_get_mem_data(out, &data);
  std::string b64 = base64_encode(reinterpret_cast<const uint8_t*>(data), static_cast<size_t>(len));
  BIO_free(out);
  std::string wrapped;
  for (size_t i = 0; i < b64.size(); i += 64) {
    if (i) wrapped += "\n";
    wrapped += b64.substr(i, 64);
  }
  return wrapped;
}

std::string iso8601_now() {
  time_t t = time(nullptr);
  char buf[32];
  strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", gmtime(&t));
  return buf;
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

int serve(const Args& args, const Identity& id, const std::string& state_dir) {
  auto signer = region_signer(state_dir, id.region);
  if (!signer.is_ok()) {
    log_error(signer.status().message());
    return 1;
  }
  const std::string document = identity_document(id);
  auto rsa2048 = sign_document(signer.value(), document);
  if (!rsa2048.is_ok()) {
    log_error(rsa2048.status().message());
    return 1;
  }
  std::string listen = args.get("listen", "127.0.0.1:18080");
  auto colon = listen.rfind(':');
  std::string host = listen.substr(0, colon);
  int port = colon == std::string::npos ? 0 : atoi(listen.c_str() + colon + 1);

  httplib::Server srv;
  srv.set_tcp_nodelay(true);
  TokenTable tokens;
  srv.Put("/latest/api/token", [&tokens](const httplib::Request& req, httplib::Response& res) {
    if (req.has_header("X-Forwarded-For")) {
      res.status = 403;
      res.set_content("Forbidden", "text/plain");
      return;
    }
    std::string ttl_text = req.get_header_value("X-aws-ec2-metadata-token-ttl-seconds");
    int ttl = atoi(ttl_text.c_str());
    if (ttl_text.empty() || ttl < 1 || ttl > 21600) {
      res.status = 400;
      res.set_content("Bad Request", "text/plain");
      return;
    }
    res.set_header("X-aws-ec2-metadata-token-ttl-seconds", std::to_string(ttl));
    res.set_content(tokens.issue(ttl), "text/plain");
  });
  std::map<std::string, std::string> paths = {
      {"/latest/dynamic/instance-identity/document", document},
      {"/latest/dynamic/instance-identity/rsa2048", rsa2048.value()},
      {"/latest/meta-data/instance-id", id.instance_id},
      {"/latest/meta-data/ami-id", id.image_id},
      {"/latest/meta-data/instance-type", id.instance_type},
      {"/latest/meta-data/placement/region", id.region},
      {"/latest/meta-data/placement/availability-zone", id.az},
  };
  srv.Get(".*", [&tokens, &paths](const httplib::Request& req, httplib::Response& res) {
    // IMDSv2 required: a GET without a valid session token is 401.
    if (!tokens.valid(req.get_header_value("X-aws-ec2-metadata-token"))) {
      res.status = 401;
      res.set_content("Unauthorized", "text/plain");
      return;
    }
    auto it = paths.find(req.path);
    if (it == paths.end()) {
      res.status = 404;
      res.set_content("Not Found", "text/plain");
      return;
    }
    res.set_content(it->second, "text/plain");
  });
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
    Status s = write_file_atomically(args.get("port-file"), std::to_string(port) + "\n",
                                             0644);
    if (!s.is_ok()) {
      log_error(s.message());
      return 1;
    }
  }
  log_info(str_cat("IMDSv2 for ", id.instance_id, " (account ", id.account, ", ", id.region,
                   ") on http://", host, ":", port));
  srv.listen_after_bind();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  log_init("keygate-metadata-emulator", LogSink::kStderr, LogLevel::kInfo);
  signal(SIGPIPE, SIG_IGN);
  std::vector<std::string> argv_list(argv + 1, argv + argc);
  auto args = Args::parse(argv_list,
                          {"state-dir", "listen", "port-file", "account", "region",
                           "availability-zone", "instance-id", "image-id", "instance-type",
                           "architecture", "private-ip"},
                          {"help"});
  if (!args.is_ok() || args->positional().size() != 1 || !args->has("state-dir")) {
    if (!args.is_ok()) log_error(args.status().message());
    fputs(kUsage, stderr);
    return 2;
  }
  const std::string state_dir = args->get("state-dir");
  if (args->positional()[0] == "init") {
    auto regions = args->get_all("region");
    if (regions.empty()) regions.push_back("us-east-1");
    for (const auto& region : regions) {
      auto s = region_signer(state_dir, region);
      if (!s.is_ok()) {
        log_error(s.status().message());
        return 1;
      }
    }
    return 0;
  }
  if (args->positional()[0] != "serve") {
    fputs(kUsage, stderr);
    return 2;
  }
  Identity id;
  id.account = args->get("account", "123456789012");
  id.region = args->get("region", "us-east-1");
  id.az = args->get("availability-zone", id.region + "a");
  id.instance_id = args->get("instance-id", "i-0123456789abcdef0");
  id.image_id = args->get("image-id", "ami-0abcdef1234567890");
  id.instance_type = args->get("instance-type", "t3.micro");
  id.architecture = args->get("architecture", "x86_64");
  id.private_ip = args->get("private-ip", "10.0.0.10");
  id.pending_time = iso8601_now();
  return serve(args.value(), id, state_dir);
}
