#include "tests/lossy_proxy.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <stdexcept>

namespace keygate::testing {
namespace {

int listen_loopback(int* port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(fd, 64) != 0 || getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    throw std::runtime_error("lossy proxy: cannot listen on 127.0.0.1");
  }
  *port = ntohs(addr.sin_port);
  return fd;
}

int connect_loopback(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (fd >= 0 && connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) return fd;
  if (fd >= 0) close(fd);
  return -1;
}

bool send_all(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// Counts the TLS records of type application_data (23) in a byte stream
// fed in pieces. In TLS 1.3 a client's first one is its Finished, the next
// its HTTP request.
class RecordCounter {
 public:
  void feed(const uint8_t* p, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      if (skip_ > 0) {
        --skip_;
        continue;
      }
      header_[have_++] = p[i];
      if (have_ == 5) {
        if (header_[0] == 23) ++application_records_;
        skip_ = static_cast<size_t>(header_[3]) << 8 | header_[4];
        have_ = 0;
      }
    }
  }
  int application_records() const { return application_records_; }

 private:
  uint8_t header_[5] = {};
  size_t have_ = 0;
  size_t skip_ = 0;
  int application_records_ = 0;
};

}  // namespace

LossyProxy::LossyProxy(int upstream_port, std::function<bool(int)> lose)
    : upstream_port_(upstream_port), lose_(std::move(lose)) {
  listener_ = listen_loopback(&port_);
  acceptor_ = std::thread([this] { accept_loop(); });
}

LossyProxy::~LossyProxy() {
  stop_ = true;
  shutdown(listener_, SHUT_RDWR);
  acceptor_.join();
  for (auto& t : relays_) t.join();
  close(listener_);
}

void LossyProxy::accept_loop() {
  while (!stop_) {
    pollfd p{listener_, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    int client = accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
    if (client < 0) continue;
    const int n = ++connections_;
    relays_.emplace_back([this, client, n] { relay(client, n); });
  }
}

void LossyProxy::relay(int client, int connection) {
  using Clock = std::chrono::steady_clock;
  int server = connect_loopback(upstream_port_);
  const bool lossy = lose_(connection);
  RecordCounter from_client;
  bool cut = false;  // the request is through: nothing more reaches the client
  Clock::time_point cut_at;
  bool server_open = server >= 0;
  uint8_t buf[16384];
  while (server >= 0 && !stop_) {
    // The server has had a second to carry the request out; then the
    // client sees its connection end with no answer.
    if (cut && Clock::now() - cut_at > std::chrono::seconds(1)) break;
    pollfd fds[2] = {{client, POLLIN, 0}, {server_open ? server : -1, POLLIN, 0}};
    if (poll(fds, 2, 100) <= 0) continue;
    if (fds[0].revents != 0) {
      ssize_t n = recv(client, buf, sizeof(buf), 0);
      if (n <= 0 || !send_all(server, buf, static_cast<size_t>(n))) break;
      if (lossy && !cut) {
        from_client.feed(buf, static_cast<size_t>(n));
        if (from_client.application_records() >= 2) {
          cut = true;
          cut_at = Clock::now();
          ++lost_;
        }
      }
    }
    if (fds[1].revents != 0) {
      ssize_t n = recv(server, buf, sizeof(buf), 0);
      if (n <= 0) {
        if (!cut) break;
        server_open = false;  // done; the client still hears nothing until the cut ends
        continue;
      }
      if (!cut && !send_all(client, buf, static_cast<size_t>(n))) break;
    }
  }
  if (server >= 0) close(server);
  close(client);
}

}  // namespace keygate::testing
