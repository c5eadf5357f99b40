#include "tests/fault_proxy.h"

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

using Clock = std::chrono::steady_clock;

int listen_loopback(int* port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(fd, 64) != 0 || getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    throw std::runtime_error("fault proxy: cannot listen on 127.0.0.1");
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

void reset(int fd) {
  linger l{1, 0};  // close() sends RST
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
}

// Counts the TLS records of type application_data (23) in a byte stream
// fed in pieces, and says at which offset of a piece a given record starts.
class RecordCounter {
 public:
  // Feeds a piece; returns the offset in it at which application record
  // number `wanted` (1-based) begins, or -1 if it does not begin in it.
  long feed(const uint8_t* p, size_t n, int wanted) {
    long found = -1;
    for (size_t i = 0; i < n; ++i) {
      if (skip_ > 0) {
        --skip_;
        continue;
      }
      if (have_ == 0) start_ = static_cast<long>(i);
      header_[have_++] = p[i];
      if (have_ == 5) {
        if (header_[0] == 23 && ++application_records_ == wanted && found < 0) {
          found = start_ < 0 ? 0 : start_;
        }
        skip_ = static_cast<size_t>(header_[3]) << 8 | header_[4];
        have_ = 0;
      }
    }
    if (have_ > 0) start_ = -1;  // a header split across pieces
    return found;
  }
  int application_records() const { return application_records_; }

 private:
  uint8_t header_[5] = {};
  size_t have_ = 0;
  size_t skip_ = 0;
  long start_ = 0;
  int application_records_ = 0;
};

}  // namespace

const char* fault_kind_name(FaultKind k) {
  switch (k) {
    case FaultKind::kNone: return "none";
    case FaultKind::kDrop: return "drop";
    case FaultKind::kDelay: return "delay";
    case FaultKind::kTruncate: return "truncate";
    case FaultKind::kReset: return "reset";
    case FaultKind::kCorrupt: return "corrupt";
    case FaultKind::kLoseAnswer: return "lose-answer";
  }
  return "?";
}

const char* fault_phase_name(FaultPhase p) {
  switch (p) {
    case FaultPhase::kHandshake: return "handshake";
    case FaultPhase::kRequest: return "request";
    case FaultPhase::kResponse: return "response";
  }
  return "?";
}

FaultProxy::FaultProxy(int upstream_port, bool tls, std::function<Fault(int)> fault_for)
    : upstream_port_(upstream_port), tls_(tls), fault_for_(std::move(fault_for)) {
  listener_ = listen_loopback(&port_);
  acceptor_ = std::thread([this] { accept_loop(); });
}

FaultProxy::~FaultProxy() {
  stop_ = true;
  shutdown(listener_, SHUT_RDWR);
  acceptor_.join();
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& t : relays_) t.join();
  close(listener_);
}

void FaultProxy::accept_loop() {
  while (!stop_) {
    pollfd p{listener_, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    int client = accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
    if (client < 0) continue;
    const int n = ++connections_;
    std::lock_guard<std::mutex> lock(mu_);
    relays_.emplace_back([this, client, n] { relay(client, n); });
  }
}

void FaultProxy::relay(int client, int connection) {
  const Fault fault = fault_for_(connection);
  bool pending = fault.kind != FaultKind::kNone;  // the fault has yet to strike
  bool dropped = false;                           // kDrop or kLoseAnswer struck
  Clock::time_point struck_at;
  auto strike = [&] {
    pending = false;
    struck_at = Clock::now();
    ++struck_;
  };
  // Plain link, handshake phase: the fault strikes on the connection itself.
  if (pending && !tls_ && fault.phase == FaultPhase::kHandshake) {
    strike();
    switch (fault.kind) {
      case FaultKind::kReset: reset(client); [[fallthrough]];
      case FaultKind::kTruncate: close(client); return;
      case FaultKind::kDelay:
        std::this_thread::sleep_for(std::chrono::milliseconds(fault.delay_ms));
        break;
      case FaultKind::kCorrupt: pending = true; break;  // nothing to corrupt yet: the first answer byte
      default: dropped = true; break;
    }
  }
  int server = connect_loopback(upstream_port_);
  RecordCounter from_client;
  bool request_sent = false;  // the client's first request has gone through
  uint8_t buf[16384];
  while (server >= 0 && !stop_) {
    if (dropped && fault.kind == FaultKind::kLoseAnswer &&
        Clock::now() - struck_at > std::chrono::seconds(1)) {
      break;  // the server had its second to carry the request out
    }
    // A dropped connection stays open, silent, until the client gives up
    // (or a minute passes).
    if (dropped && Clock::now() - struck_at > std::chrono::seconds(60)) break;
    pollfd fds[2] = {{client, POLLIN, 0}, {server, POLLIN, 0}};
    if (poll(fds, 2, 100) <= 0) continue;
    for (int side = 0; side < 2; ++side) {
      if (fds[side].revents == 0) continue;
      const bool upward = side == 0;  // client to server
      const int from = upward ? client : server, to = upward ? server : client;
      ssize_t got = recv(from, buf, sizeof(buf), 0);
      if (got <= 0) {
        if (dropped && !upward) continue;  // the client still hears nothing
        goto done;
      }
      size_t n = static_cast<size_t>(got);
      if (dropped) {
        if (upward && fault.kind == FaultKind::kLoseAnswer) send_all(to, buf, n);
        continue;
      }
      // Where in this piece the fault's phase begins, if it does.
      long at = -1;
      if (upward) {
        const long request_at = tls_ ? from_client.feed(buf, n, 2) : 0;
        if (!request_sent && request_at >= 0) {
          if (pending && fault.phase == FaultPhase::kRequest) at = request_at;
          request_sent = true;
          if (pending && fault.kind == FaultKind::kLoseAnswer) {
            send_all(to, buf, n);
            strike();
            dropped = true;
            continue;
          }
        }
      } else if (pending) {
        const bool handshake = tls_ && from_client.application_records() == 0;
        if (fault.phase == FaultPhase::kHandshake && (handshake || !tls_)) at = 0;
        if (fault.phase == FaultPhase::kResponse && request_sent) at = 0;
      }
      if (at < 0 || !pending) {
        if (!send_all(to, buf, n)) goto done;
        continue;
      }
      strike();
      const size_t head = static_cast<size_t>(at);
      switch (fault.kind) {
        case FaultKind::kDrop:
          send_all(to, buf, head);
          dropped = true;
          break;
        case FaultKind::kDelay:
          std::this_thread::sleep_for(std::chrono::milliseconds(fault.delay_ms));
          if (!send_all(to, buf, n)) goto done;
          break;
        case FaultKind::kTruncate:
          send_all(to, buf, head + (n - head) / 2);
          goto done;
        case FaultKind::kReset:
          send_all(to, buf, head);
          reset(client);
          goto done;
        case FaultKind::kCorrupt:
          // A byte past the record header: in TLS, inside the record's
          // protected body; in plain HTTP, the last byte (of the body).
          buf[tls_ ? std::min(n - 1, head + 8) : n - 1] ^= 0x01;
          if (!send_all(to, buf, n)) goto done;
          break;
        default: break;
      }
    }
  }
done:
  if (server >= 0) close(server);
  close(client);
}

}  // namespace keygate::testing
