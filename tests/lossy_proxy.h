// A TCP proxy on 127.0.0.1 in front of a TLS server that, for chosen
// connections, delivers the client's request but never its answer: the
// lost reply of a request the server did carry out, as a dropped network
// path or a server killed after its commit looks to a client.
#pragma once

#include <atomic>
#include <functional>
#include <thread>
#include <vector>

namespace keygate::testing {

class LossyProxy {
 public:
  // `lose(n)`: whether the answer on the n-th connection (1-based) is lost.
  LossyProxy(int upstream_port, std::function<bool(int connection)> lose);
  ~LossyProxy();
  LossyProxy(const LossyProxy&) = delete;
  LossyProxy& operator=(const LossyProxy&) = delete;

  int port() const { return port_; }
  int connections() const { return connections_.load(); }
  int answers_lost() const { return lost_.load(); }

 private:
  void accept_loop();
  void relay(int client, int connection);

  int upstream_port_;
  std::function<bool(int)> lose_;
  int listener_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  std::atomic<int> lost_{0};
  std::thread acceptor_;
  std::vector<std::thread> relays_;
};

}  // namespace keygate::testing
