// keygate-boot-storm: the load generator of bench/boot_storm.sh.
//
// A boot storm as the key server sees it: every unlock is a booting
// instance, so each one opens a new TCP connection and a new TLS session
// (no resumption: a booting instance has no ticket), asks for a challenge,
// sends an unlock with AWS-format evidence (fetched once from the metadata
// emulator, signed like AWS signs), and checks that the wrapped secret
// unwraps, under its own X25519 key, to the volume's secret as enrollment
// handed it out. Anything else (a refusal, a wrong secret, a timeout) is an
// error, counted and shown.
//
// The same generator drives tang's recovery exchange (POST /rec/<kid>, the
// request `clevis luks unlock` makes at boot) for comparison: each exchange
// is a new TCP connection, and the answer is checked the way clevis checks
// it (the recovered point must be the one bound).
//
// Two loops: closed (N clients, each starting its next unlock when the last
// one ends: the maximum rate) and open (unlocks started at a fixed offered
// rate whatever the server does, latency counted from the scheduled start,
// so a stalled server shows up in the tail instead of slowing the offer).
//
// Prints one tab-separated row per run (--header prints the column names).

#include <dirent.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/obj_mac.h>
#include <openssl/x509v3.h>
#include <sys/resource.h>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/args.h"
#include "core/crypto.h"
#include "core/encoding.h"
#include "core/envelope.h"
#include "core/file.h"
#include "core/json.h"
#include "core/log.h"
#include "core/protocol.h"
#include "core/secret.h"
#include "unlocker/evidence.h"
#include "unlocker/server_client.h"

namespace keygate::bench {
namespace {

namespace asio = boost::asio;
namespace ssl = asio::ssl;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using asio::awaitable;
using asio::use_awaitable;

constexpr char kUsage[] = R"(usage: keygate-boot-storm keygate|tang|tls [options]

keygate (each unlock: new TCP + TLS connection, challenge, unlock, unwrap check)
  --url https://127.0.0.1:PORT   the key server (repeatable: replicas of one
                                 store, each unlock to the next in turn)
  --ca FILE                      its CA certificate (verified: no way to turn it off)
  --metadata-url URL             the AWS metadata emulator (evidence, fetched once)
  --token-file FILE              an enrollment token: the run enrolls its own volume
tang (each exchange: new TCP connection, POST /rec/<kid>, recovery check)
  --url http://127.0.0.1:PORT    tang (its advertisement is fetched once)
tls (each exchange: new TCP + TLS connection, one POST /, HTTP 200: the
     machine's ceiling for any TLS service, with no key work at all)
  --url https://127.0.0.1:PORT   any HTTPS server answering 200 (nginx in the bench)
  --ca FILE                      its CA certificate (verified as for keygate)
all
  --mode closed|open             closed: --concurrency clients back to back (default)
                                 open: unlocks started at --rate per second
  --concurrency N                closed loop clients (default 64)
  --rate N                       open loop offered unlocks per second
  --count N                      measured unlocks (default 10000)
  --warmup N                     unmeasured unlocks first (default 200)
  --threads N                    generator threads (default 1)
  --timeout-ms N                 one unlock's bound, an error past it (default 10000)
  --server-pid PID               also report this process's CPU time per unlock,
                                 its children's included (repeatable: summed)
  --db-pid PID                   the same for the database (PostgreSQL's
                                 postmaster: its backends are its children)
  --label TEXT                   first column of the row (default: the target)
  --header                       print the column names first
)";

double ms_since(Clock::time_point t0, Clock::time_point t1) {
  return std::chrono::duration<double, std::milli>(t1 - t0).count();
}

// One process's line of /proc/PID/stat: its parent, and its CPU seconds
// (user + system), those of its children it has reaped included.
struct ProcStat {
  int ppid = 0;
  double cpu_seconds = 0;
};

std::optional<ProcStat> proc_stat(int pid) {
  auto stat = read_small_file(str_cat("/proc/", pid, "/stat"), 4096);
  if (!stat.is_ok()) return std::nullopt;
  const std::string& s = stat.value();
  const size_t close = s.rfind(')');
  if (close == std::string::npos) return std::nullopt;
  // Fields after the command name: state is field 3, ppid 4; utime 14,
  // stime 15, cutime 16, cstime 17.
  std::vector<std::string> fields;
  size_t pos = close + 2;
  while (pos < s.size() && fields.size() < 15) {
    size_t end = s.find(' ', pos);
    if (end == std::string::npos) end = s.size();
    fields.push_back(s.substr(pos, end - pos));
    pos = end + 1;
  }
  if (fields.size() < 15) return std::nullopt;
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  ProcStat out;
  out.ppid = std::atoi(fields[1].c_str());
  out.cpu_seconds = (std::stod(fields[11]) + std::stod(fields[12]) + std::stod(fields[13]) +
                     std::stod(fields[14])) /
                    ticks;
  return out;
}

// CPU seconds of a process and of all its descendants, living or reaped
// (nginx's workers, PostgreSQL's backends). A child that exits between two
// readings moves from the living into its parent's reaped count.
std::optional<double> process_cpu_seconds(int pid) {
  auto root = proc_stat(pid);
  if (!root) return std::nullopt;
  std::vector<std::pair<int, ProcStat>> all;
  if (DIR* d = opendir("/proc")) {
    while (dirent* e = readdir(d)) {
      char* end = nullptr;
      const long p = std::strtol(e->d_name, &end, 10);
      if (end == e->d_name || *end != '\0' || p == pid) continue;
      if (auto st = proc_stat(static_cast<int>(p))) all.emplace_back(static_cast<int>(p), *st);
    }
    closedir(d);
  }
  double sum = root->cpu_seconds;
  std::vector<int> parents{pid};
  while (!parents.empty()) {
    const int parent = parents.back();
    parents.pop_back();
    for (const auto& [child, st] : all) {
      if (st.ppid != parent) continue;
      sum += st.cpu_seconds;
      parents.push_back(child);
    }
  }
  return sum;
}

double self_cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  auto sec = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec / 1e6; };
  return sec(u.ru_utime) + sec(u.ru_stime);
}

// ----------------------------------------------------------------- targets --

// One exchange against the target; false (with a reason) unless it
// verified.
class Target {
 public:
  virtual ~Target() = default;
  // `deadline` bounds the whole exchange: past it the connection is closed
  // (Beast's stream timeout), its pending operation fails, and so does this.
  // Runs on a strand of its own (the generator may run several threads):
  // its stream takes the coroutine's executor, so the timeout's close and
  // the exchange's own steps never run at once.
  virtual awaitable<bool> exchange(Clock::time_point deadline, std::string* why) = 0;
};

template <class Stream>
awaitable<bool> round_trip(Stream& stream, beast::flat_buffer& buffer, const std::string& host,
                           const std::string& path, std::string body,
                           http::response<http::string_body>* res, std::string* why) {
  http::request<http::string_body> req{http::verb::post, path, 11};
  req.set(http::field::host, host);
  req.set(http::field::content_type, "application/json");
  req.keep_alive(true);
  req.body() = std::move(body);
  req.prepare_payload();
  beast::error_code ec;
  co_await http::async_write(stream, req, asio::redirect_error(use_awaitable, ec));
  if (ec) {
    *why = str_cat("write ", path, ": ", ec.message());
    co_return false;
  }
  http::response_parser<http::string_body> parser;
  parser.body_limit(api::kMaxResponseBody);
  co_await http::async_read(stream, buffer, parser, asio::redirect_error(use_awaitable, ec));
  if (ec) {
    *why = str_cat("read ", path, ": ", ec.message());
    co_return false;
  }
  *res = parser.release();
  if (res->result_int() != 200) {
    *why = str_cat(path, ": HTTP ", res->result_int(), " ", printable(res->body(), 160));
    co_return false;
  }
  co_return true;
}

struct UrlParts {
  std::string scheme, host;
  uint16_t port = 0;
};

Result<UrlParts> parse_url(const std::string& url) {
  const size_t sep = url.find("://");
  if (sep == std::string::npos)
    return Status::error(ErrorKind::kInvalidArgument, "URL without scheme");
  UrlParts u;
  u.scheme = url.substr(0, sep);
  std::string rest = url.substr(sep + 3);
  if (!rest.empty() && rest.back() == '/') rest.pop_back();
  const size_t colon = rest.rfind(':');
  if (colon == std::string::npos)
    return Status::error(ErrorKind::kInvalidArgument, "URL without port");
  u.host = rest.substr(0, colon);
  const int port = std::atoi(rest.substr(colon + 1).c_str());
  if (port <= 0 || port > 65535) return Status::error(ErrorKind::kInvalidArgument, "bad port");
  u.port = static_cast<uint16_t>(port);
  return u;
}

// A new TCP connection and a new TLS session (no resumption) to `endpoint`:
// the server's certificate verified against the CA and required to name
// the address dialled.
awaitable<bool> open_tls(beast::ssl_stream<beast::tcp_stream>& stream,
                         const tcp::endpoint& endpoint, const std::string& host,
                         Clock::time_point deadline, std::string* why) {
  beast::get_lowest_layer(stream).expires_at(deadline);
  X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(stream.native_handle()), host.c_str());
  beast::error_code ec;
  co_await beast::get_lowest_layer(stream).async_connect(endpoint,
                                                         asio::redirect_error(use_awaitable, ec));
  if (ec) {
    *why = "connect: " + ec.message();
    co_return false;
  }
  co_await stream.async_handshake(ssl::stream_base::client,
                                  asio::redirect_error(use_awaitable, ec));
  if (ec) {
    *why = "TLS handshake: " + ec.message();
    co_return false;
  }
  co_return true;
}

class KeygateTarget : public Target {
 public:
  KeygateTarget(std::vector<UrlParts> urls, ssl::context& tls, std::string volume_id,
                SecretBuffer secret, std::string evidence_json)
      : urls_(std::move(urls)),
        tls_(tls),
        volume_id_(std::move(volume_id)),
        secret_(std::move(secret)),
        evidence_json_(std::move(evidence_json)) {
    for (const UrlParts& u : urls_) endpoints_.emplace_back(asio::ip::make_address(u.host), u.port);
  }

  awaitable<bool> exchange(Clock::time_point deadline, std::string* why) override {
    // Replicas in turn, one whole unlock each (as instances spread over them).
    const size_t at = next_.fetch_add(1) % urls_.size();
    const UrlParts& url = urls_[at];
    beast::ssl_stream<beast::tcp_stream> stream(co_await asio::this_coro::executor, tls_);
    if (!co_await open_tls(stream, endpoints_[at], url.host, deadline, why)) co_return false;
    beast::error_code ec;
    beast::flat_buffer buffer;
    http::response<http::string_body> res;
    if (!co_await round_trip(stream, buffer, url.host, api::kChallengePath, "{}", &res, why)) {
      co_return false;
    }
    auto challenge = parse_json_object(res.body(), api::kMaxResponseBody);
    auto nonce_text = challenge.is_ok() ? json_string(challenge.value(), api::field::kNonce, 128)
                                        : Result<std::string>(challenge.status());
    auto nonce =
        nonce_text.is_ok() ? base64_decode(nonce_text.value()) : Result<Bytes>(nonce_text.status());
    if (!nonce.is_ok() || nonce->size() != api::kNonceSize) {
      *why = "challenge: malformed nonce";
      co_return false;
    }
    auto keys = X25519KeyPair::generate();
    if (!keys.is_ok()) {
      *why = keys.status().message();
      co_return false;
    }
    std::string body =
        str_cat("{\"", api::field::kVolumeId, "\":\"", volume_id_, "\",\"", api::field::kNonce,
                "\":\"", nonce_text.value(), "\",\"", api::field::kClientPublicKey, "\":\"",
                base64_encode(keys->public_key.data(), keys->public_key.size()), "\",\"",
                api::field::kEvidence, "\":", evidence_json_, "}");
    if (!co_await round_trip(stream, buffer, url.host, api::kUnlockPath, std::move(body), &res,
                             why)) {
      co_return false;
    }
    // Done with the connection: a booting instance closes it.
    beast::get_lowest_layer(stream).socket().close(ec);
    auto answer = parse_json_object(res.body(), api::kMaxResponseBody);
    auto wrapped_json = answer.is_ok() ? json_object(answer.value(), api::field::kWrapped, true)
                                       : Result<Json::Value>(answer.status());
    auto wrapped = wrapped_json.is_ok() ? WrappedSecret::from_json(wrapped_json.value())
                                        : Result<WrappedSecret>(wrapped_json.status());
    if (!wrapped.is_ok()) {
      *why = "unlock answer: " + wrapped.status().message();
      co_return false;
    }
    auto secret = unwrap_secret(wrapped.value(), keys.value(), volume_id_, nonce.value());
    if (!secret.is_ok()) {
      *why = "unwrap: " + secret.status().message();
      co_return false;
    }
    if (secret->size() != secret_.size() ||
        std::memcmp(secret->data(), secret_.data(), secret_.size()) != 0) {
      *why = "the released secret is not the volume's";
      co_return false;
    }
    co_return true;
  }

 private:
  const std::vector<UrlParts> urls_;
  ssl::context& tls_;
  const std::string volume_id_;
  const SecretBuffer secret_;
  const std::string evidence_json_;
  std::vector<tcp::endpoint> endpoints_;
  std::atomic<size_t> next_{0};
};

// -------------------------------------------------------------------- tls --
//
// The floor under any TLS service on this machine: the same connection a
// booting instance opens (new TCP, new verified TLS session), one small
// request answered 200, and nothing else: no challenge, no evidence, no
// store, no key. Against nginx, this row is what the machine gives when a
// server does no work at all beyond the handshake.

class TlsTarget : public Target {
 public:
  TlsTarget(UrlParts url, ssl::context& tls)
      : url_(std::move(url)), tls_(tls), endpoint_(asio::ip::make_address(url_.host), url_.port) {}

  awaitable<bool> exchange(Clock::time_point deadline, std::string* why) override {
    beast::ssl_stream<beast::tcp_stream> stream(co_await asio::this_coro::executor, tls_);
    if (!co_await open_tls(stream, endpoint_, url_.host, deadline, why)) co_return false;
    beast::flat_buffer buffer;
    http::response<http::string_body> res;
    if (!co_await round_trip(stream, buffer, url_.host, "/", "{}", &res, why)) co_return false;
    beast::error_code ec;
    beast::get_lowest_layer(stream).socket().close(ec);
    co_return true;
  }

 private:
  const UrlParts url_;
  ssl::context& tls_;
  const tcp::endpoint endpoint_;
};

// ------------------------------------------------------------------- tang --
//
// McCallum-Relyea recovery as clevis does it. Bound once: c random,
// C = cG (in the JWE), K = cS (S: tang's exchange key). Each recovery:
// e random, X = C + eG sent; tang answers Y = sX; K' = Y - eS must be K.

using BnPtr = std::unique_ptr<BIGNUM, decltype(&BN_free)>;
using PointPtr = std::unique_ptr<EC_POINT, decltype(&EC_POINT_free)>;

struct EcCurve {
  int nid;
  const char* jwk_name;
  size_t coordinate_size;
};
constexpr EcCurve kCurves[] = {{NID_secp521r1, "P-521", 66},
                               {NID_secp384r1, "P-384", 48},
                               {NID_X9_62_prime256v1, "P-256", 32}};

class TangTarget : public Target {
 public:
  static Result<std::unique_ptr<TangTarget>> create(UrlParts url,
                                                    const std::string& advertisement) {
    auto adv = parse_json_object(advertisement, 1 << 20);
    if (!adv.is_ok()) return adv.status().with_context("tang advertisement");
    auto payload_text = json_string(adv.value(), "payload", 1 << 20);
    if (!payload_text.is_ok()) return payload_text.status().with_context("tang advertisement");
    auto payload = base64url_decode(payload_text.value());
    if (!payload.is_ok()) return payload.status().with_context("tang advertisement payload");
    auto keys = parse_json_object(std::string(payload->begin(), payload->end()), 1 << 20);
    if (!keys.is_ok()) return keys.status().with_context("tang advertisement payload");
    for (const Json::Value& k : keys.value()["keys"]) {
      bool derive = false;
      for (const Json::Value& op : k["key_ops"]) derive = derive || op.asString() == "deriveKey";
      if (!derive) continue;
      for (const EcCurve& curve : kCurves) {
        if (k["crv"].asString() != curve.jwk_name) continue;
        auto t = std::unique_ptr<TangTarget>(new TangTarget(std::move(url), curve));
        KEYGATE_RETURN_IF_ERROR(t->bind(k));
        return t;
      }
    }
    return Status::error(ErrorKind::kNotFound, "tang advertises no EC exchange (deriveKey) key");
  }

  awaitable<bool> exchange(Clock::time_point deadline, std::string* why) override {
    std::string request;
    PointPtr e_s(nullptr, EC_POINT_free);
    if (!make_request(&request, &e_s)) {
      *why = "EC arithmetic failed";
      co_return false;
    }
    beast::tcp_stream stream(co_await asio::this_coro::executor);
    stream.expires_at(deadline);
    beast::error_code ec;
    co_await stream.async_connect(endpoint_, asio::redirect_error(use_awaitable, ec));
    if (ec) {
      *why = "connect: " + ec.message();
      co_return false;
    }
    beast::flat_buffer buffer;
    http::response<http::string_body> res;
    if (!co_await round_trip(stream, buffer, url_.host, "/rec/" + kid_, std::move(request), &res,
                             why)) {
      co_return false;
    }
    stream.socket().close(ec);
    if (!check_answer(res.body(), e_s.get())) {
      *why = "tang's answer does not recover the bound key";
      co_return false;
    }
    co_return true;
  }

 private:
  TangTarget(UrlParts url, const EcCurve& curve)
      : url_(std::move(url)),
        curve_(curve),
        endpoint_(asio::ip::make_address(url_.host), url_.port),
        group_(EC_GROUP_new_by_curve_name(curve.nid), EC_GROUP_free),
        server_(nullptr, EC_POINT_free),
        bound_c_(nullptr, EC_POINT_free),
        bound_k_(nullptr, EC_POINT_free) {}

  PointPtr point() const { return PointPtr(EC_POINT_new(group_.get()), EC_POINT_free); }

  Result<PointPtr> point_from_jwk(const Json::Value& jwk) const {
    auto x = base64url_decode(jwk["x"].asString());
    auto y = base64url_decode(jwk["y"].asString());
    if (!x.is_ok() || !y.is_ok())
      return Status::error(ErrorKind::kInvalidArgument, "JWK coordinates");
    BnPtr bx(BN_bin2bn(x->data(), static_cast<int>(x->size()), nullptr), BN_free);
    BnPtr by(BN_bin2bn(y->data(), static_cast<int>(y->size()), nullptr), BN_free);
    PointPtr p = point();
    if (!bx || !by || !p ||
        EC_POINT_set_affine_coordinates(group_.get(), p.get(), bx.get(), by.get(), nullptr) != 1) {
      return Status::error(ErrorKind::kInvalidArgument, "JWK is not a point on the curve");
    }
    return p;
  }

  std::string coordinate(const BIGNUM* v) const {
    Bytes b(curve_.coordinate_size);
    BN_bn2binpad(v, b.data(), static_cast<int>(b.size()));
    return base64url_encode(b.data(), b.size());
  }

  Result<std::pair<std::string, std::string>> coordinates(const EC_POINT* p) const {
    BnPtr x(BN_new(), BN_free), y(BN_new(), BN_free);
    if (EC_POINT_get_affine_coordinates(group_.get(), p, x.get(), y.get(), nullptr) != 1) {
      return Status::error(ErrorKind::kInternal, "EC point coordinates");
    }
    return std::pair{coordinate(x.get()), coordinate(y.get())};
  }

  Status bind(const Json::Value& jwk) {
    auto s = point_from_jwk(jwk);
    if (!s.is_ok()) return s.status();
    server_ = std::move(s).value();
    // kid: the key's RFC 7638 thumbprint (SHA-256), as clevis asks for it.
    const std::string canonical =
        str_cat("{\"crv\":\"", curve_.jwk_name, "\",\"kty\":\"EC\",\"x\":\"", jwk["x"].asString(),
                "\",\"y\":\"", jwk["y"].asString(), "\"}");
    Bytes thp = sha256(canonical);
    kid_ = base64url_encode(thp.data(), thp.size());
    BnPtr c = random_scalar();
    bound_c_ = point();
    bound_k_ = point();
    if (!c || !bound_c_ || !bound_k_ ||
        EC_POINT_mul(group_.get(), bound_c_.get(), c.get(), nullptr, nullptr, nullptr) != 1 ||
        EC_POINT_mul(group_.get(), bound_k_.get(), nullptr, server_.get(), c.get(), nullptr) != 1) {
      return Status::error(ErrorKind::kInternal, "EC arithmetic");
    }
    return Status::ok();
  }

  BnPtr random_scalar() const {
    BnPtr v(BN_new(), BN_free);
    if (!v || BN_rand_range(v.get(), EC_GROUP_get0_order(group_.get())) != 1)
      return BnPtr(nullptr, BN_free);
    return v;
  }

  bool make_request(std::string* request, PointPtr* e_s) const {
    BnPtr e = random_scalar();
    PointPtr x = point();
    *e_s = point();
    if (!e || !x || !*e_s ||
        EC_POINT_mul(group_.get(), x.get(), e.get(), nullptr, nullptr, nullptr) != 1 ||
        EC_POINT_add(group_.get(), x.get(), x.get(), bound_c_.get(), nullptr) != 1 ||
        EC_POINT_mul(group_.get(), e_s->get(), nullptr, server_.get(), e.get(), nullptr) != 1) {
      return false;
    }
    auto xy = coordinates(x.get());
    if (!xy.is_ok()) return false;
    *request =
        str_cat("{\"alg\":\"ECMR\",\"crv\":\"", curve_.jwk_name, "\",\"key_ops\":[\"deriveKey\"],",
                "\"kty\":\"EC\",\"x\":\"", xy->first, "\",\"y\":\"", xy->second, "\"}");
    return true;
  }

  bool check_answer(const std::string& body, const EC_POINT* e_s) const {
    auto jwk = parse_json_object(body, 1 << 16);
    if (!jwk.is_ok()) return false;
    auto y = point_from_jwk(jwk.value());
    if (!y.is_ok()) return false;
    PointPtr k = point();
    if (!k || !EC_POINT_copy(k.get(), e_s) ||
        EC_POINT_invert(group_.get(), k.get(), nullptr) != 1 ||
        EC_POINT_add(group_.get(), k.get(), k.get(), y->get(), nullptr) != 1) {
      return false;
    }
    return EC_POINT_cmp(group_.get(), k.get(), bound_k_.get(), nullptr) == 0;
  }

  const UrlParts url_;
  const EcCurve curve_;
  const tcp::endpoint endpoint_;
  std::unique_ptr<EC_GROUP, decltype(&EC_GROUP_free)> group_;
  PointPtr server_, bound_c_, bound_k_;
  std::string kid_;
};

// -------------------------------------------------------------------- run --

struct Run {
  Target& target;
  asio::io_context& io;
  size_t warmup = 200;
  size_t count = 10000;
  long timeout_ms = 10000;

  std::atomic<size_t> next{0};
  std::atomic<size_t> done{0};
  std::atomic<size_t> errors{0};
  std::vector<double> latency_ms;  // one slot per measured unlock
  std::mutex first_error_mu;
  std::string first_error;
  Clock::time_point measured_start{}, measured_end{};
  std::atomic<bool> measuring{false};

  size_t total() const { return warmup + count; }

  // One unlock, started (for the latency) at `scheduled`.
  awaitable<void> one(size_t i, Clock::time_point scheduled) {
    std::string why;
    // The bound counts from the scheduled start, as the latency does.
    const bool ok =
        co_await target.exchange(scheduled + std::chrono::milliseconds(timeout_ms), &why);
    const auto end = Clock::now();
    if (!ok) {
      std::lock_guard<std::mutex> lock(first_error_mu);
      if (first_error.empty()) first_error = (i < warmup ? "warm-up: " : "") + why;
    }
    if (i < warmup) co_return;
    latency_ms[i - warmup] = ok ? ms_since(scheduled, end) : -1.0;
    if (!ok) errors.fetch_add(1);
    if (done.fetch_add(1) + 1 == count) measured_end = end;
  }

  awaitable<void> closed_client() {
    for (size_t i = next.fetch_add(1); i < total(); i = next.fetch_add(1)) {
      if (i == warmup) begin_measuring(Clock::now());
      co_await one(i, Clock::now());
    }
  }

  void begin_measuring(Clock::time_point t) {
    bool expected = false;
    if (measuring.compare_exchange_strong(expected, true)) measured_start = t;
  }

  // Starts unlock i at start + i / rate, whatever is still in flight.
  awaitable<void> open_scheduler(double rate) {
    auto executor = co_await asio::this_coro::executor;
    asio::steady_timer timer(executor);
    const auto start = Clock::now();
    for (size_t i = 0; i < total(); ++i) {
      const auto at = start + std::chrono::duration_cast<Clock::duration>(
                                  std::chrono::duration<double>(static_cast<double>(i) / rate));
      timer.expires_at(at);
      co_await timer.async_wait(asio::as_tuple(use_awaitable));
      if (i == warmup) begin_measuring(at);
      asio::co_spawn(asio::make_strand(io), one(i, at), asio::detached);
    }
  }
};

struct Row {
  std::string label, mode;
  double offered = 0;
  int concurrency = 0;
  size_t count = 0, errors = 0;
  double seconds = 0, p50 = 0, p99 = 0, p999 = 0, max = 0;
  double gen_cpu_ms = 0, server_cpu_ms = -1, db_cpu_ms = -1;
};

double percentile(std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  const size_t idx =
      std::min(sorted.size() - 1, static_cast<size_t>(q * static_cast<double>(sorted.size())));
  return sorted[idx];
}

void print_header() {
  std::cout << "target\tmode\toffered/s\tclients\tunlocks\terrors\tthroughput/s\tp50 ms\tp99 ms\t"
               "p99.9 ms\tmax ms\tserver CPU ms/unlock\tdatabase CPU ms/unlock\t"
               "generator CPU ms/unlock\n";
}

void print_row(const Row& r) {
  auto f = [](double v, int digits) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*f", digits, v);
    return std::string(buf);
  };
  std::cout << r.label << "\t" << r.mode << "\t" << (r.mode == "open" ? f(r.offered, 0) : "max")
            << "\t" << (r.mode == "closed" ? std::to_string(r.concurrency) : "-") << "\t" << r.count
            << "\t" << r.errors << "\t" << f(static_cast<double>(r.count) / r.seconds, 0) << "\t"
            << f(r.p50, 1) << "\t" << f(r.p99, 1) << "\t" << f(r.p999, 1) << "\t" << f(r.max, 1)
            << "\t" << (r.server_cpu_ms < 0 ? "-" : f(r.server_cpu_ms, 2)) << "\t"
            << (r.db_cpu_ms < 0 ? "-" : f(r.db_cpu_ms, 2)) << "\t" << f(r.gen_cpu_ms, 2) << "\n";
}

int fail(const std::string& what) {
  std::cerr << "keygate-boot-storm: " << printable(what, 1024) << "\n";
  return 1;
}

// The client side of every TLS row: only --ca is trusted, and there is no
// resumption (every booting instance is a first contact). The CA's PEM.
Result<std::string> trust_ca(const Args& args, ssl::context& tls) {
  auto ca = read_small_file(args.get("ca"), 1 << 20);
  if (!ca.is_ok()) return ca.status().with_context("--ca");
  tls.set_verify_mode(ssl::verify_peer);
  boost::system::error_code ec;
  tls.add_certificate_authority(asio::buffer(ca.value()), ec);
  if (ec) return Status::error(ErrorKind::kInvalidArgument, "--ca: not a PEM certificate");
  SSL_CTX_set_session_cache_mode(tls.native_handle(), SSL_SESS_CACHE_OFF);
  SSL_CTX_set_options(tls.native_handle(), SSL_OP_NO_TICKET);
  return ca;
}

Result<std::unique_ptr<Target>> tls_target(const Args& args, ssl::context& tls) {
  auto url = parse_url(args.get("url"));
  if (!url.is_ok() || url->scheme != "https") {
    return Status::error(ErrorKind::kInvalidArgument, "--url must be https://ADDRESS:PORT");
  }
  auto ca = trust_ca(args, tls);
  if (!ca.is_ok()) return ca.status();
  return std::unique_ptr<Target>(new TlsTarget(std::move(url).value(), tls));
}

Result<std::unique_ptr<Target>> keygate_target(const Args& args, ssl::context& tls) {
  std::vector<UrlParts> urls;
  for (const std::string& u : args.get_all("url")) {
    auto url = parse_url(u);
    if (!url.is_ok() || url->scheme != "https") {
      return Status::error(ErrorKind::kInvalidArgument, "--url must be https://ADDRESS:PORT");
    }
    urls.push_back(url.value());
  }
  if (urls.empty()) return Status::error(ErrorKind::kInvalidArgument, "--url is required");
  auto ca = trust_ca(args, tls);
  if (!ca.is_ok()) return ca.status();

  auto token = read_small_file(args.get("token-file"), 4096);
  if (!token.is_ok()) return token.status().with_context("--token-file");
  std::string token_text = token.value();
  while (!token_text.empty() && (token_text.back() == '\n' || token_text.back() == '\r'))
    token_text.pop_back();
  auto token_secret = SecretBuffer::copy_of(token_text.data(), token_text.size());
  if (!token_secret.is_ok()) return token_secret.status();

  // Enroll the run's own volume: its secret is what every unlock must get.
  unlocker::ServerEndpoint server{args.get_all("url").front(), ca.value()};
  unlocker::EvidenceCollector evidence(args.get("metadata-url"), unlocker::Platform::kAws, 5000);
  auto enrollment = unlocker::register_volume(server, token_secret.value(), &evidence, nullptr,
                                              "boot-storm bench");
  if (!enrollment.is_ok()) return enrollment.status().with_context("enrollment");
  KEYGATE_RETURN_IF_ERROR(
      unlocker::confirm_volume(server, enrollment->volume_id, enrollment->secret));
  auto aws = unlocker::collect_aws_evidence(args.get("metadata-url"), 5000);
  if (!aws.is_ok()) return aws.status().with_context("AWS evidence");
  return std::unique_ptr<Target>(new KeygateTarget(std::move(urls), tls, enrollment->volume_id,
                                                   std::move(enrollment->secret),
                                                   to_json(aws.value())));
}

Result<std::unique_ptr<Target>> tang_target(const Args& args, asio::io_context& io) {
  auto url = parse_url(args.get("url"));
  if (!url.is_ok() || url->scheme != "http") {
    return Status::error(ErrorKind::kInvalidArgument, "--url must be http://ADDRESS:PORT for tang");
  }
  // The advertisement, once, as clevis fetches it at bind time.
  beast::tcp_stream stream(io);
  beast::error_code ec;
  stream.connect(tcp::endpoint(asio::ip::make_address(url->host), url->port), ec);
  if (ec) return Status::error(ErrorKind::kUnavailable, "tang: " + ec.message());
  http::request<http::empty_body> req{http::verb::get, "/adv", 11};
  req.set(http::field::host, url->host);
  http::write(stream, req, ec);
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  if (!ec) http::read(stream, buffer, res, ec);
  if (ec || res.result_int() != 200) {
    return Status::error(ErrorKind::kUnavailable, "tang: GET /adv failed");
  }
  auto t = TangTarget::create(url.value(), res.body());
  if (!t.is_ok()) return t.status();
  return std::unique_ptr<Target>(std::move(t).value());
}

int main_impl(int argc, char** argv) {
  const std::string first = argc < 2 ? "" : argv[1];
  if (first != "keygate" && first != "tang" && first != "tls") {
    std::cerr << kUsage;
    return 2;
  }
  const std::string kind = argv[1];
  auto parsed =
      Args::parse(std::vector<std::string>(argv + 2, argv + argc),
                  {"url", "ca", "metadata-url", "token-file", "mode", "concurrency", "rate",
                   "count", "warmup", "threads", "timeout-ms", "server-pid", "db-pid", "label"},
                  {"header"});
  if (!parsed.is_ok()) {
    std::cerr << parsed.status().message() << "\n" << kUsage;
    return 2;
  }
  const Args& args = parsed.value();
  log_init("keygate-boot-storm", LogSink::kStderr, LogLevel::kWarning);
  // As the unlocker does (its keys cost the same), sized for many in flight.
  if (Status heap = init_openssl_secure_heap(kSecureHeapServer); !heap.is_ok())
    return fail(heap.message());
  const std::string mode = args.get("mode", "closed");
  auto concurrency = args.get_int("concurrency", 64, 1, 100000);
  auto rate = args.get_int("rate", 0, 0, 1000000);
  auto count = args.get_int("count", 10000, 1, 100000000);
  auto warmup = args.get_int("warmup", 200, 0, 100000000);
  auto threads = args.get_int("threads", 1, 1, 256);
  auto timeout_ms = args.get_int("timeout-ms", 10000, 1, 600000);
  std::vector<int> server_pids, db_pids;
  for (const char* option : {"server-pid", "db-pid"}) {
    for (const std::string& p : args.get_all(option)) {
      char* end = nullptr;
      const long pid = std::strtol(p.c_str(), &end, 10);
      if (end == p.c_str() || *end != '\0' || pid <= 0 || pid > (1 << 22)) {
        std::cerr << "--" << option << ": not a process id\n" << kUsage;
        return 2;
      }
      (std::string(option) == "db-pid" ? db_pids : server_pids).push_back(static_cast<int>(pid));
    }
  }
  for (const auto* r : {&concurrency, &rate, &count, &warmup, &threads, &timeout_ms}) {
    if (!r->is_ok()) {
      std::cerr << r->status().message() << "\n" << kUsage;
      return 2;
    }
  }
  if ((mode != "closed" && mode != "open") || (mode == "open" && rate.value() == 0)) {
    std::cerr << "--mode is closed or open; open needs --rate\n" << kUsage;
    return 2;
  }
  // Enough descriptors for everything in flight.
  rlimit nofile{};
  if (getrlimit(RLIMIT_NOFILE, &nofile) == 0) {
    nofile.rlim_cur = nofile.rlim_max;
    setrlimit(RLIMIT_NOFILE, &nofile);
  }

  asio::io_context io(static_cast<int>(threads.value()));
  ssl::context tls(ssl::context::tls_client);
  auto target = kind == "keygate" ? keygate_target(args, tls)
                : kind == "tls"   ? tls_target(args, tls)
                                  : tang_target(args, io);
  if (!target.is_ok()) return fail(target.status().message());

  Run run{*target.value(), io};
  run.warmup = static_cast<size_t>(warmup.value());
  run.count = static_cast<size_t>(count.value());
  run.timeout_ms = timeout_ms.value();
  run.latency_ms.assign(run.count, -1.0);
  if (run.warmup == 0) run.begin_measuring(Clock::now());

  // Processes' CPU seconds summed (none when one cannot be read, or none
  // was named).
  auto cpu_of = [](const std::vector<int>& pids) -> std::optional<double> {
    if (pids.empty()) return std::nullopt;
    double sum = 0;
    for (int pid : pids) {
      auto s = process_cpu_seconds(pid);
      if (!s) return std::nullopt;
      sum += *s;
    }
    return sum;
  };
  std::optional<double> server_cpu0, server_cpu1, db_cpu0, db_cpu1;
  double gen_cpu0 = 0;
  // The CPU counters are read when the measured part begins and ends.
  std::thread sampler([&] {
    while (!run.measuring.load()) std::this_thread::sleep_for(std::chrono::microseconds(200));
    server_cpu0 = cpu_of(server_pids);
    db_cpu0 = cpu_of(db_pids);
    gen_cpu0 = self_cpu_seconds();
  });

  if (mode == "closed") {
    for (long c = 0; c < concurrency.value(); ++c) {
      asio::co_spawn(asio::make_strand(io), run.closed_client(), asio::detached);
    }
  } else {
    asio::co_spawn(io, run.open_scheduler(static_cast<double>(rate.value())), asio::detached);
  }
  std::vector<std::thread> pool;
  for (long t = 1; t < threads.value(); ++t) pool.emplace_back([&io] { io.run(); });
  io.run();
  for (auto& t : pool) t.join();
  sampler.join();
  server_cpu1 = cpu_of(server_pids);
  db_cpu1 = cpu_of(db_pids);
  const double gen_cpu1 = self_cpu_seconds();

  Row row;
  row.label = args.get("label", kind);
  row.mode = mode;
  row.offered = static_cast<double>(rate.value());
  row.concurrency = static_cast<int>(concurrency.value());
  row.count = run.count;
  row.errors = run.errors.load();
  if (run.measured_end == Clock::time_point{}) run.measured_end = Clock::now();
  row.seconds = std::chrono::duration<double>(run.measured_end - run.measured_start).count();
  std::vector<double> ok;
  for (double v : run.latency_ms) {
    if (v >= 0) ok.push_back(v);
  }
  std::sort(ok.begin(), ok.end());
  row.p50 = percentile(ok, 0.50);
  row.p99 = percentile(ok, 0.99);
  row.p999 = percentile(ok, 0.999);
  row.max = ok.empty() ? 0 : ok.back();
  const double per = 1000.0 / static_cast<double>(run.count);
  row.gen_cpu_ms = (gen_cpu1 - gen_cpu0) * per;
  if (server_cpu0 && server_cpu1) row.server_cpu_ms = (*server_cpu1 - *server_cpu0) * per;
  if (db_cpu0 && db_cpu1) row.db_cpu_ms = (*db_cpu1 - *db_cpu0) * per;
  if (args.has("header")) print_header();
  print_row(row);
  if (!run.first_error.empty()) {
    std::cerr << "keygate-boot-storm: first error: " << printable(run.first_error, 512) << "\n";
  }
  return row.errors == 0 && run.first_error.empty() ? 0 : 1;
}

}  // namespace
}  // namespace keygate::bench

int main(int argc, char** argv) { return keygate::bench::main_impl(argc, argv); }
