#include "server/http_api.h"

#include <openssl/ssl.h>
#include <sys/resource.h>

#include <array>
#include <atomic>
#include <optional>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <chrono>
#include <csignal>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "core/file.h"
#include "core/json.h"
#include "core/log.h"
#include "core/protocol.h"

namespace keygate::server {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;
using Request = http::request<http::string_body>;
using Response = http::response<http::string_body>;

constexpr size_t kMaxHeaderBytes = 8 * 1024;
// After a refused request the connection is closed; what the client is still
// sending is read and dropped first (up to this much, within a second), so
// that the close does not reset the connection before the answer is read.
constexpr size_t kMaxDrainBytes = 1 << 20;

// TLS 1.3, and TLS 1.2 with ECDHE key exchange and AEAD ciphers only.
constexpr char kTls12Ciphers[] =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

bool starts_with(std::string_view text, std::string_view prefix) {
  return text.substr(0, prefix.size()) == prefix;
}

int per_core(int configured, int per = 1) {
  if (configured > 0) return configured;
  return per * static_cast<int>(std::max(2u, std::thread::hardware_concurrency()));
}
// Workers wait on the store's fsync as well as compute: four per core, so
// that releases arriving together share one audit commit (group commit).
int worker_count(const HttpOptions& o) { return per_core(o.workers, 4); }

// Open connections, in total and per source address.
class ConnectionCounts {
 public:
  ConnectionCounts(int total, int per_source) : max_total_(total), max_per_source_(per_source) {}

  // False (nothing counted) when either cap is reached.
  bool admit(const std::string& source) {
    std::lock_guard<std::mutex> lock(mu_);
    int& mine = per_source_[source];
    if (total_ >= max_total_ || mine >= max_per_source_) {
      if (mine == 0) per_source_.erase(source);
      return false;
    }
    ++mine;
    ++total_;
    return true;
  }
  int total() {
    std::lock_guard<std::mutex> lock(mu_);
    return total_;
  }
  void release(const std::string& source) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = per_source_.find(source);
    if (it != per_source_.end() && --it->second <= 0) per_source_.erase(it);
    --total_;
  }

 private:
  std::mutex mu_;
  const int max_total_, max_per_source_;
  int total_ = 0;
  std::map<std::string, int> per_source_;
};

// What every answer says about how a browser may use it: nothing cached,
// not framed, nothing sniffed, no referrer; a console page may load only
// this server's own scripts and styles (no inline script) and talk only to
// this server.
constexpr char kConsolePolicy[] =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
constexpr char kApiPolicy[] = "default-src 'none'; frame-ancestors 'none'";

struct Front {
  KeyService& service;
  AdminService* admin;
  const HttpOptions& options;
  ssl::context& tls;
  asio::thread_pool& workers;
  asio::thread_pool& admin_workers;  // the admin API's own (HttpOptions::admin_workers)
  ConnectionCounts counts;
  std::atomic<uint64_t> refused_connections{0};
};

using ServiceCall = ApiResponse (KeyService::*)(std::string_view, const std::string&);

// The API's routes: (path, call). A challenge takes no body.
struct Route {
  const char* path;
  ServiceCall call;
};
const Route kRoutes[] = {
    {api::kUnlockPath, &KeyService::unlock},
    {api::kEnrollRegisterPath, &KeyService::enroll_register},
    {api::kEnrollConfirmPath, &KeyService::enroll_confirm},
    {api::kEnrollAbandonPath, &KeyService::enroll_abandon},
};
constexpr char kHealthPath[] = "/v1/health";

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, Front& front, std::string peer)
      : socket_(std::move(socket)), idle_timer_(socket_.get_executor()), front_(front),
        peer_(std::move(peer)) {}
  ~Session() { front_.counts.release(peer_); }

  // No TLS state is made for a connection until its first bytes arrive: an
  // idle connection costs its socket and a timer, not a TLS engine and its
  // buffers. The handshake deadline runs from the accept.
  void start() {
    beast::error_code ignored;
    socket_.set_option(tcp::no_delay(true), ignored);
    handshake_deadline_ = std::chrono::steady_clock::now() +
                          std::chrono::milliseconds(front_.options.handshake_timeout_ms);
    idle_timer_.expires_at(handshake_deadline_);
    idle_timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (!ec && !self->stream_) self->close();
    });
    socket_.async_wait(tcp::socket::wait_read, [self = shared_from_this()](beast::error_code ec) {
      self->idle_timer_.cancel();
      if (ec || !self->socket_.is_open()) return self->close();
      self->handshake();
    });
  }

 private:
  void handshake() {
    stream_.emplace(std::move(socket_), front_.tls);
    beast::get_lowest_layer(*stream_).expires_at(handshake_deadline_);
    stream_->async_handshake(ssl::stream_base::server,
                             [self = shared_from_this()](beast::error_code ec) {
                               if (ec) return self->close();
                               self->read_request();
                             });
  }

  void read_request() {
    parser_.emplace();
    parser_->header_limit(kMaxHeaderBytes);
    parser_->body_limit(api::kMaxRequestBody);
    beast::get_lowest_layer(*stream_).expires_after(
        std::chrono::milliseconds(front_.options.request_timeout_ms));
    http::async_read(*stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       self->on_read(ec);
                     });
  }

  void on_read(beast::error_code ec) {
    if (ec == http::error::end_of_stream || ec == asio::error::eof ||
        ec == ssl::error::stream_truncated) {
      return shutdown();
    }
    if (ec == beast::error::timeout || ec == asio::error::operation_aborted) return close();
    if (ec == http::error::body_limit) {
      return refuse(error_response(400, api::kErrTooLarge,
                                   str_cat("request body larger than ", api::kMaxRequestBody,
                                           " bytes")));
    }
    if (ec == http::error::header_limit) {
      return refuse(error_response(400, api::kErrBadRequest, "request header too large"));
    }
    if (ec) {
      // Garbage, a bad chunk, a broken TLS record: if HTTP, it gets an answer.
      if (ec.category() == http::make_error_code(http::error::bad_target).category()) {
        return refuse(error_response(400, api::kErrBadRequest, "malformed HTTP request"));
      }
      return close();
    }
    handle(parser_->release());
  }

  void handle(Request request) {
    keep_alive_ = request.keep_alive() &&
                  ++served_ < front_.options.max_requests_per_connection;
    const std::string_view target(request.target().data(), request.target().size());
    const bool post = request.method() == http::verb::post;
    if (target == kHealthPath) {
      if (request.method() != http::verb::get) return answer(not_allowed());
      ApiResponse ok;
      ok.body["status"] = "ok";
      return answer(ok);
    }
    if (target == api::kChallengePath) {
      if (!post) return answer(not_allowed());
      return on_worker([](KeyService& s, std::string_view, const std::string& peer) {
        return s.challenge(peer);
      }, std::move(request));
    }
    if (front_.admin != nullptr && (starts_with(target, kAdminPathPrefix) || starts_with(target, kConsolePathPrefix) ||
                                    target == kMetricsPath || target == "/console")) {
      return on_admin(std::move(request));
    }
    for (const Route& route : kRoutes) {
      if (target != route.path) continue;
      if (!post) return answer(not_allowed());
      const ServiceCall call = route.call;
      return on_worker([call](KeyService& s, std::string_view body, const std::string& peer) {
        return (s.*call)(body, peer);
      }, std::move(request));
    }
    answer(error_response(404, api::kErrNotFound, "no such endpoint"));
  }

  // The admin API: only with a client certificate that verified against
  // the admin CA in this connection's handshake (or the session it resumed).
  // It runs on the admin workers: however long an admin request takes, the
  // unlock workers stay free.
  void on_admin(Request request) {
    std::optional<AdminPeer> peer;
    SSL* ssl = stream_->native_handle();
    if (X509* cert = SSL_get0_peer_certificate(ssl); cert != nullptr && SSL_get_verify_result(ssl) == X509_V_OK) {
      peer = admin_peer_of(cert);
    }
    auto self = shared_from_this();
    asio::post(front_.admin_workers, [self, peer = std::move(peer), request = std::move(request)]() mutable {
      ApiResponse response;
      try {
        const std::string_view target(request.target().data(), request.target().size());
        const std::string method(request.method_string());
        AdminService& admin = *self->front_.admin;
        const AdminPeer* who = peer ? &*peer : nullptr;
        const bool get = request.method() == http::verb::get;
        if (target == "/console") {
          response.status = 308;  // the console's pages name their files relative to /console/
          response.location = kConsolePathPrefix;
        } else if (starts_with(target, kConsolePathPrefix)) {
          response = get ? admin.console(who, target, self->peer_) : not_allowed();
        } else if (target == kMetricsPath) {
          response = get ? admin.metrics(who, self->peer_, self->front_.counts.total()) : not_allowed();
        } else {
          auto header = [&](http::field f) { return std::string(request[f]); };
          const AdminRequestHeaders headers{header(http::field::content_type), header(http::field::origin),
                                            std::string(request["Sec-Fetch-Site"]), header(http::field::host)};
          response = admin.handle(who, method, target, request.body(), self->peer_, headers);
        }
      } catch (const std::exception&) {
        response = error_response(500, api::kErrInternal, "internal error");
      }
      asio::post(self->stream_->get_executor(),
                 [self, response = std::move(response)]() { self->answer(response); });
    });
  }

  static ApiResponse not_allowed() {
    return error_response(405, api::kErrMethodNotAllowed, "method not allowed");
  }

  // The key service runs on the worker pool; the answer is written back on
  // this connection's strand.
  template <typename Work>
  void on_worker(Work work, Request request) {
    auto self = shared_from_this();
    asio::post(front_.workers, [self, work, request = std::move(request)]() mutable {
      ApiResponse response;
      try {
        response = work(self->front_.service, request.body(), self->peer_);
      } catch (const std::exception&) {
        response = error_response(500, api::kErrInternal, "internal error");
      }
      asio::post(self->stream_->get_executor(),
                 [self, response = std::move(response)]() { self->answer(response); });
    });
  }

  void answer(const ApiResponse& api) { write(api, false); }
  // Answers, then drains what the client still sends, then closes.
  void refuse(const ApiResponse& api) {
    keep_alive_ = false;
    write(api, true);
  }

  void write(const ApiResponse& api, bool drain_after) {
    response_.emplace();
    response_->version(11);
    response_->result(static_cast<unsigned>(api.status));
    const bool page = !api.content_type.empty();
    response_->set(http::field::content_type, page ? api.content_type : "application/json");
    response_->set(http::field::cache_control, "no-store");
    response_->set("Content-Security-Policy", page ? kConsolePolicy : kApiPolicy);
    response_->set("X-Content-Type-Options", "nosniff");
    response_->set("X-Frame-Options", "DENY");
    response_->set("Referrer-Policy", "no-referrer");
    response_->set("Cross-Origin-Resource-Policy", "same-origin");
    if (!api.location.empty()) response_->set(http::field::location, api.location);
    if (api.retry_after_seconds > 0) {
      response_->set(http::field::retry_after, std::to_string(api.retry_after_seconds));
    }
    response_->keep_alive(keep_alive_);
    response_->body() = page ? api.text : to_json(api.body);
    response_->prepare_payload();
    beast::get_lowest_layer(*stream_).expires_after(
        std::chrono::milliseconds(front_.options.write_timeout_ms));
    http::async_write(*stream_, *response_,
                      [self = shared_from_this(), drain_after](beast::error_code ec, size_t) {
                        if (ec) return self->close();
                        if (drain_after) return self->drain(0);
                        if (!self->keep_alive_) return self->shutdown();
                        self->read_request();
                      });
  }

  void drain(size_t drained) {
    if (drained == 0) beast::get_lowest_layer(*stream_).expires_after(std::chrono::seconds(1));
    if (drained >= kMaxDrainBytes) return close();
    stream_->async_read_some(asio::buffer(scratch_),
                            [self = shared_from_this(), drained](beast::error_code ec, size_t n) {
                              if (ec) return self->close();
                              self->drain(drained + n);
                            });
  }

  void shutdown() {
    beast::get_lowest_layer(*stream_).expires_after(std::chrono::seconds(1));
    stream_->async_shutdown([self = shared_from_this()](beast::error_code) { self->close(); });
  }

  void close() {
    beast::error_code ignored;
    tcp::socket& socket = stream_ ? beast::get_lowest_layer(*stream_).socket() : socket_;
    socket.shutdown(tcp::socket::shutdown_both, ignored);
    socket.close(ignored);
  }

  tcp::socket socket_;  // until the first bytes arrive; then moved into stream_
  asio::steady_timer idle_timer_;
  std::chrono::steady_clock::time_point handshake_deadline_;
  std::optional<beast::ssl_stream<beast::tcp_stream>> stream_;
  Front& front_;
  const std::string peer_;
  beast::flat_buffer buffer_{kMaxHeaderBytes + api::kMaxRequestBody};
  std::optional<http::request_parser<http::string_body>> parser_;
  std::optional<Response> response_;
  std::array<char, 16 * 1024> scratch_{};
  int served_ = 0;
  bool keep_alive_ = false;
};

class Listener : public std::enable_shared_from_this<Listener> {
 public:
  Listener(asio::io_context& io, tcp::acceptor acceptor, Front& front)
      : io_(io), acceptor_(std::move(acceptor)), front_(front) {}

  void accept() {
    acceptor_.async_accept(asio::make_strand(io_),
                           [self = shared_from_this()](beast::error_code ec, tcp::socket socket) {
                             self->on_accept(ec, std::move(socket));
                           });
  }
  void stop() {
    beast::error_code ignored;
    acceptor_.close(ignored);
    retry_.cancel();
  }

 private:
  void on_accept(beast::error_code ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted) return;  // stopped
    if (!ec) {
      beast::error_code peer_ec;
      auto remote = socket.remote_endpoint(peer_ec);
      std::string peer = peer_ec ? "?" : remote.address().to_string();
      if (front_.counts.admit(peer)) {
        std::make_shared<Session>(std::move(socket), front_, std::move(peer))->start();
      } else {
        // Over a cap: closed at once, so the connections that fit get in.
        if (front_.refused_connections++ % 1000 == 0) {
          log_warning(str_cat("connection from ", peer, " refused: too many open connections"));
        }
        socket.close(peer_ec);
      }
    } else {
      // Out of descriptors or memory: the same error would come back at
      // once, so wait a little (open connections close by their deadlines).
      if (accept_errors_++ % 100 == 0) log_warning(str_cat("accept: ", ec.message()));
      retry_.expires_after(std::chrono::milliseconds(50));
      retry_.async_wait([self = shared_from_this()](beast::error_code wait_ec) {
        if (!wait_ec) self->accept();
      });
      return;
    }
    accept();
  }

  asio::io_context& io_;
  tcp::acceptor acceptor_;
  Front& front_;
  asio::steady_timer retry_{io_};
  uint64_t accept_errors_ = 0;
};

// Connections need descriptors: as many as the hard limit allows.
void raise_descriptor_limit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    (void)setrlimit(RLIMIT_NOFILE, &limit);
  }
}

Status load_tls(ssl::context& tls, const HttpOptions& options) {
  beast::error_code ec;
  tls.set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 |
                      ssl::context::no_sslv3 | ssl::context::no_tlsv1 |
                      ssl::context::no_tlsv1_1 | ssl::context::single_dh_use,
                  ec);
  SSL_CTX* ctx = tls.native_handle();
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
  // An idle connection keeps no 17 KiB read and write buffers.
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  // Resumption by stateless tickets only: no session cache to grow with a
  // boot storm's thousands of first contacts, and one ticket per connection
  // (OpenSSL's default is two; a booting instance resumes at most once).
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_num_tickets(ctx, 1);
  if (SSL_CTX_set_cipher_list(ctx, kTls12Ciphers) != 1) {
    return Status::error(ErrorKind::kInternal, "TLS: cipher list not supported");
  }
  if (!ec) tls.use_certificate_chain_file(options.cert_file, ec);
  if (!ec) tls.use_private_key_file(options.key_file, ssl::context::pem, ec);
  if (ec) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("TLS: cannot load ", options.cert_file, " / ", options.key_file,
                                 ": ", ec.message()));
  }
  if (!options.admin_ca_file.empty()) {
    // Client certificates are asked for, not required: instances have none,
    // and the admin API refuses a request without one. One that does not
    // verify against the admin CA (as a client certificate) ends the
    // handshake. Only the admin CA is trusted here, not the system's.
    tls.load_verify_file(options.admin_ca_file, ec);
    if (ec) {
      return Status::error(ErrorKind::kInvalidArgument,
                           str_cat("TLS: cannot load the admin CA ", options.admin_ca_file, ": ", ec.message()));
    }
    STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(options.admin_ca_file.c_str());
    if (names == nullptr) {
      return Status::error(ErrorKind::kInvalidArgument, str_cat("TLS: admin CA ", options.admin_ca_file, " unreadable"));
    }
    SSL_CTX_set_client_CA_list(ctx, names);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
    SSL_CTX_set_verify_depth(ctx, 1);
    SSL_CTX_set_purpose(ctx, X509_PURPOSE_SSL_CLIENT);
    static const unsigned char kContext[] = "keygate-server";
    SSL_CTX_set_session_id_context(ctx, kContext, sizeof kContext - 1);
  }
  return Status::ok();
}

}  // namespace

Status serve_https(KeyService& service, AdminService* admin, const HttpOptions& options) {
  std::signal(SIGPIPE, SIG_IGN);
  raise_descriptor_limit();
  ssl::context tls(ssl::context::tls_server);
  KEYGATE_RETURN_IF_ERROR(load_tls(tls, options));

  // Declared before the I/O context: sessions it still holds when it is
  // destroyed count themselves out of `front`.
  asio::thread_pool workers(static_cast<size_t>(worker_count(options)));
  const int admin_workers_count = std::max(1, options.admin_workers);
  asio::thread_pool admin_workers(static_cast<size_t>(admin_workers_count));
  Front front{service, admin, options, tls, workers, admin_workers,
              ConnectionCounts(options.max_connections, options.max_connections_per_source)};
  const int io_threads = per_core(options.io_threads);
  asio::io_context io(io_threads);
  // SIGHUP: on_reload, on a worker (it reads a file and writes the audit
  // trail), as often as it comes; caught from before the port is announced.
  asio::signal_set hangups(io, SIGHUP);
  std::function<void()> wait_for_hangup = [&] {
    hangups.async_wait([&](beast::error_code failed, int) {
      if (failed) return;
      if (options.on_reload) asio::post(workers, options.on_reload);
      wait_for_hangup();
    });
  };
  wait_for_hangup();
  beast::error_code ec;
  auto address = asio::ip::make_address(options.host, ec);
  if (ec) return Status::error(ErrorKind::kInvalidArgument, str_cat("--listen: bad address ", options.host));
  tcp::acceptor acceptor(io);
  const tcp::endpoint endpoint(address, static_cast<unsigned short>(options.port));
  acceptor.open(endpoint.protocol(), ec);
  if (!ec) acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor.bind(endpoint, ec);
  if (!ec) acceptor.listen(options.backlog, ec);
  if (ec) {
    return Status::error(ErrorKind::kIo,
                         str_cat("cannot bind ", options.host, ":", options.port, ": ", ec.message()));
  }
  const int port = acceptor.local_endpoint().port();
  if (!options.port_file.empty()) {
    KEYGATE_RETURN_IF_ERROR(
        write_file_atomically(options.port_file, std::to_string(port) + "\n", 0644));
  }

  auto listener = std::make_shared<Listener>(io, std::move(acceptor), front);
  listener->accept();

  asio::signal_set signals(io, SIGTERM, SIGINT);
  signals.async_wait([&](beast::error_code, int sig) {
    log_info(str_cat("signal ", sig, ": shutting down"));
    listener->stop();
    hangups.cancel();
    io.stop();
  });
  log_info(str_cat("listening on https://", options.host, ":", port, " (", io_threads,
                   " I/O threads, ", worker_count(options), " workers, ", admin_workers_count,
                   " for the admin API)"));
  std::vector<std::thread> threads;
  for (int i = 1; i < io_threads; ++i) threads.emplace_back([&io] { io.run(); });
  io.run();
  for (auto& t : threads) t.join();
  workers.join();
  admin_workers.join();
  return Status::ok();
}

}  // namespace keygate::server
