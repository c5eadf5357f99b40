#include "server/http_api.h"

#include <httplib.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>

#include <thread>

#include "core/json.h"
#include "core/log.h"
#include "core/protocol.h"
#include "server/state_files.h"

namespace keygate::server {
namespace {

void send(httplib::Response& res, const ApiResponse& api) {
  res.status = api.status;
  res.set_header("Cache-Control", "no-store");
  res.set_content(to_json(api.body), "application/json");
}

using ServiceCall = ApiResponse (KeyService::*)(std::string_view, const std::string&);

httplib::Server::Handler post_handler(KeyService& service, ServiceCall call) {
  return [&service, call](const httplib::Request& req, httplib::Response& res) {
    send(res, (service.*call)(req.body, req.remote_addr));
  };
}

}  // namespace

Status serve_https(KeyService& service, const HttpOptions& options) {
  // Block termination signals in every thread; one thread waits for them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  httplib::SSLServer server(options.cert_file.c_str(), options.key_file.c_str());
  if (!server.is_valid()) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("TLS: cannot load ", options.cert_file, " / ", options.key_file));
  }
  SSL_CTX_set_min_proto_version(server.ssl_context(), TLS1_2_VERSION);
  server.set_payload_max_length(api::kMaxRequestBody);
  server.set_read_timeout(5, 0);
  server.set_write_timeout(5, 0);
  server.set_keep_alive_max_count(20);
  // Responses go out in several writes; without this, Nagle + delayed ACK
  // add 40 ms to every request.
  server.set_tcp_nodelay(true);

  server.Post(api::kChallengePath, [&service](const httplib::Request& req, httplib::Response& res) {
    send(res, service.challenge(req.remote_addr));
  });
  server.Post(api::kUnlockPath, post_handler(service, &KeyService::unlock));
  server.Post(api::kEnrollRegisterPath, post_handler(service, &KeyService::enroll_register));
  server.Post(api::kEnrollConfirmPath, post_handler(service, &KeyService::enroll_confirm));
  server.Get("/v1/health", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("{\"status\":\"ok\"}", "application/json");
  });
  server.set_error_handler(httplib::Server::HandlerWithResponse(
      [](const httplib::Request&, httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    if (res.status == 413) {
      send(res, error_response(400, api::kErrTooLarge,
                               str_cat("request body larger than ", api::kMaxRequestBody,
                                       " bytes")));
    } else if (res.status == 404) {
      send(res, error_response(404, api::kErrNotFound, "no such endpoint"));
    } else if (res.status == 405) {
      send(res, error_response(405, api::kErrMethodNotAllowed, "method not allowed"));
    } else {
      send(res, error_response(res.status, api::kErrBadRequest, "bad request"));
    }
    return httplib::Server::HandlerResponse::Handled;
  }));
  server.set_exception_handler(
      [](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
        send(res, error_response(500, api::kErrInternal, "internal error"));
      });

  int port = options.port;
  if (port == 0) {
    port = server.bind_to_any_port(options.host);
    if (port <= 0) {
      return Status::error(ErrorKind::kIo, str_cat("cannot bind ", options.host));
    }
  } else if (!server.bind_to_port(options.host, port)) {
    return Status::error(ErrorKind::kIo, str_cat("cannot bind ", options.host, ":", port));
  }
  if (!options.port_file.empty()) {
    KEYGATE_RETURN_IF_ERROR(
        write_file_atomically(options.port_file, std::to_string(port) + "\n", 0644));
  }
  std::thread waiter([&server, signals]() {
    int sig = 0;
    sigwait(&signals, &sig);
    log_info(str_cat("signal ", sig, ": shutting down"));
    server.stop();
  });
  log_info(str_cat("listening on https://", options.host, ":", port));
  bool ok = server.listen_after_bind();
  if (waiter.joinable()) {
    // listen ended without a signal (error): wake the waiter.
    pthread_kill(waiter.native_handle(), SIGTERM);
    waiter.join();
  }
  if (!ok) return Status::error(ErrorKind::kIo, "server stopped with an error");
  return Status::ok();
}

}  // namespace keygate::server
