// A fault-injecting TCP proxy on 127.0.0.1, between the unlocker and a key
// server (TLS) or a metadata service (plain HTTP): for the connections a
// test picks, it drops, delays, truncates, resets or corrupts the traffic
// at one phase of the exchange, or delivers a request and loses its answer.
//
// Phases. On a TLS link: kHandshake is the server's first flight (before the
// client has finished its handshake), kRequest the client's first request
// (its second application-data record in TLS 1.3: the first is its
// Finished), kResponse the server's first bytes after that request. On a
// plain link: kHandshake is the connection itself (the fault strikes before
// any byte), kRequest the client's first bytes, kResponse the server's
// first bytes.
#pragma once

#include <atomic>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace keygate::testing {

enum class FaultKind {
  kNone,
  kDrop,      // nothing more passes either way; the connection stays open
  kDelay,     // the phase's bytes wait delay_ms, then everything passes
  kTruncate,  // half of the phase's first bytes pass, then both ends close
  kReset,     // the client's connection is reset (RST) at the phase
  kCorrupt,   // one byte of the phase's first bytes is flipped
  kLoseAnswer,  // the request passes, its answer never does; closed a second later
};
enum class FaultPhase { kHandshake, kRequest, kResponse };

struct Fault {
  FaultKind kind = FaultKind::kNone;
  FaultPhase phase = FaultPhase::kResponse;
  int delay_ms = 1500;
};

const char* fault_kind_name(FaultKind k);
const char* fault_phase_name(FaultPhase p);

class FaultProxy {
 public:
  // `fault_for(n)`: the fault for the n-th connection (1-based). `tls`:
  // the link carries TLS (phases are found from its records).
  FaultProxy(int upstream_port, bool tls, std::function<Fault(int connection)> fault_for);
  ~FaultProxy();
  FaultProxy(const FaultProxy&) = delete;
  FaultProxy& operator=(const FaultProxy&) = delete;

  int port() const { return port_; }
  int connections() const { return connections_.load(); }
  // Connections on which the fault struck.
  int faults() const { return struck_.load(); }

 private:
  void accept_loop();
  void relay(int client, int connection);

  int upstream_port_;
  bool tls_;
  std::function<Fault(int)> fault_for_;
  int listener_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  std::atomic<int> struck_{0};
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<std::thread> relays_;
};

}  // namespace keygate::testing
