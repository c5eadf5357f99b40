// The server under the connections an attacker on the network can make,
// while a booting instance unlocks: idle TCP connections, clients that send
// a byte a second (before and after the TLS handshake), chunked uploads far
// over the body limit, and more connections from one address than its cap.
// Every abusive connection must be closed within its deadline, the unlock
// must go through in its usual time, and the server's memory stay bounded.
// Abusers connect from other loopback addresses (127.0.0.2 ...) than the
// unlock (127.0.0.1), as attackers would from other hosts.
#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>

#include <csignal>
#include <fstream>
#include <sstream>

#include "tests/keygate_fixture.h"

namespace keygate::testing {
namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// A TCP connection to the server from `source` (a loopback address).
int connect_from(const std::string& source, int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in local{};
  local.sin_family = AF_INET;
  inet_pton(AF_INET, source.c_str(), &local.sin_addr);
  sockaddr_in remote{};
  remote.sin_family = AF_INET;
  remote.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &remote.sin_addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&local), sizeof(local)) != 0 ||
      connect(fd, reinterpret_cast<sockaddr*>(&remote), sizeof(remote)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// True once the peer has closed `fd` (EOF or reset), waiting up to `ms`.
bool closed_by_peer(int fd, int ms) {
  pollfd p{fd, POLLIN, 0};
  const auto start = Clock::now();
  while (since(start) * 1000 < ms) {
    if (poll(&p, 1, 100) > 0) {
      char b[4096];
      ssize_t n = recv(fd, b, sizeof(b), MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return true;
    }
  }
  return false;
}

long peak_rss_kib(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

struct TlsClient {
  SSL_CTX* ctx = nullptr;
  TlsClient() {
    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);  // the abuser does not care who answers
  }
  ~TlsClient() { SSL_CTX_free(ctx); }
  // A TLS session over `fd` (blocking), or null.
  SSL* handshake(int fd) {
    SSL* ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) != 1) {
      SSL_free(ssl);
      return nullptr;
    }
    return ssl;
  }
};

class AbuseTest : public KeygateTest {};

TEST_F(AbuseTest, IdleSlowAndOversizedClientsStarveNoUnlock) {
  signal(SIGPIPE, SIG_IGN);  // writes to connections the server closed
  auto [vol, id] = enrolled_volume();
  ASSERT_FALSE(id.empty());
  const int port = server_.port;
  constexpr int kIdle = 1000, kSlowTls = 25, kSlowHttp = 25, kUploads = 8;
  constexpr long kUploadBytes = 64L << 20;
  // The server's deadlines (http_api.h): 5 s for a handshake, 10 s for a
  // request; closed by then, with slack for a loaded machine. The slow
  // clients look once a second, so they see a close up to a second late.
  constexpr int kHandshakeDeadlineMs = 5000 + 1500, kRequestDeadlineMs = 10000 + 1500;
  constexpr int kSlowClientLagMs = 1000 + 500;

  // 1,000 idle TCP connections, 100 from each of ten addresses (under the
  // per-address cap, so the server holds them all).
  std::vector<int> idle;
  for (int i = 0; i < kIdle; ++i) {
    int fd = connect_from("127.0.0." + std::to_string(2 + i / 100), port);
    ASSERT_GE(fd, 0) << "connection " << i << ": " << strerror(errno);
    idle.push_back(fd);
  }
  const auto idle_since = Clock::now();

  // 25 clients dribbling a ClientHello, 25 dribbling HTTP headers after the
  // handshake: one byte a second each, from one thread.
  TlsClient tls;
  std::atomic<bool> stop{false};
  std::atomic<int> slow_closed{0};
  std::atomic<double> slow_tls_worst{0}, slow_http_worst{0};
  std::thread slow([&] {
    struct Slow {
      int fd;
      SSL* ssl;
      Clock::time_point since;
      bool done = false;
    };
    std::vector<Slow> clients;
    for (int i = 0; i < kSlowTls; ++i) {
      clients.push_back({connect_from("127.0.0.20", port), nullptr, Clock::now()});
    }
    for (int i = 0; i < kSlowHttp; ++i) {
      int fd = connect_from("127.0.0.21", port);
      SSL* ssl = fd >= 0 ? tls.handshake(fd) : nullptr;
      clients.push_back({fd, ssl, Clock::now()});
    }
    const std::string head = "POST /v1/unlock HTTP/1.1\r\nHost: keygate\r\nContent-Length: 10\r\n";
    for (size_t byte = 0; !stop && slow_closed < kSlowTls + kSlowHttp; ++byte) {
      for (auto& c : clients) {
        if (c.done || c.fd < 0) continue;
        // A ClientHello's record header announcing 200 bytes, then zeros.
        static const unsigned char kHello[] = {0x16, 0x03, 0x01, 0x00, 0xc8, 0x01,
                                               0x00, 0x00, 0xc4, 0x03, 0x03};
        const char b = c.ssl ? head[byte % head.size()]
                             : static_cast<char>(byte < sizeof(kHello) ? kHello[byte] : 0);
        const bool sent = c.ssl ? SSL_write(c.ssl, &b, 1) == 1
                                : send(c.fd, &b, 1, MSG_NOSIGNAL) == 1;
        if (!sent || closed_by_peer(c.fd, 1)) {
          c.done = true;
          ++slow_closed;
          auto& worst = c.ssl ? slow_http_worst : slow_tls_worst;
          worst = std::max(worst.load(), since(c.since));
        }
      }
      std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    for (auto& c : clients) {
      if (c.ssl) SSL_free(c.ssl);
      if (c.fd >= 0) close(c.fd);
    }
  });

  // Eight chunked uploads of 64 MiB: the limit holds while the body is read.
  std::vector<long> uploaded(kUploads, 0);
  std::vector<std::string> upload_answer(kUploads);
  std::vector<std::thread> uploads;
  for (int u = 0; u < kUploads; ++u) {
    uploads.emplace_back([&, u] {
      int fd = connect_from("127.0.0.30", port);
      SSL* ssl = fd >= 0 ? tls.handshake(fd) : nullptr;
      if (ssl == nullptr) return;
      std::string head = "POST /v1/unlock HTTP/1.1\r\nHost: keygate\r\nTransfer-Encoding: chunked\r\n\r\n";
      SSL_write(ssl, head.data(), static_cast<int>(head.size()));
      const std::string chunk = "10000\r\n" + std::string(0x10000, 'x') + "\r\n";
      while (uploaded[u] < kUploadBytes) {
        if (SSL_write(ssl, chunk.data(), static_cast<int>(chunk.size())) <= 0) break;
        uploaded[u] += 0x10000;
      }
      char buf[512];
      int n = SSL_read(ssl, buf, sizeof(buf));
      if (n > 0) upload_answer[u].assign(buf, static_cast<size_t>(n));
      SSL_free(ssl);
      close(fd);
    });
  }

  // Meanwhile, a booting instance unlocks as usual.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  RunResult r = unlock(vol, emulator_);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_LT(r.seconds, 3.0) << "the unlock waited on the abusers";

  for (auto& t : uploads) t.join();
  for (int u = 0; u < kUploads; ++u) {
    // Stopped at the limit, not after 64 MiB: what the client got out is the
    // 64 KiB read, the 1 MiB drained, and the two ends' socket buffers.
    EXPECT_LT(uploaded[u], 16L << 20) << "upload " << u;
    if (!upload_answer[u].empty()) {
      EXPECT_TRUE(contains(upload_answer[u], "400")) << upload_answer[u];
      EXPECT_TRUE(contains(upload_answer[u], "request_too_large") ||
                  upload_answer[u].find("Content-Length") != std::string::npos)
          << upload_answer[u];
    }
  }
  // Every idle connection closed by its handshake deadline.
  int idle_open = 0;
  for (int fd : idle) {
    const long left = kHandshakeDeadlineMs - static_cast<long>(since(idle_since) * 1000);
    if (!closed_by_peer(fd, static_cast<int>(std::max(left, 1L)))) ++idle_open;
    close(fd);
  }
  EXPECT_EQ(idle_open, 0) << "idle connections still open after the handshake deadline";
  EXPECT_LT(since(idle_since), kHandshakeDeadlineMs / 1000.0 + 1);
  // The slow ones by theirs.
  const auto wait_start = Clock::now();
  while (slow_closed < kSlowTls + kSlowHttp && since(wait_start) < 15) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  stop = true;
  slow.join();
  EXPECT_EQ(slow_closed.load(), kSlowTls + kSlowHttp);
  EXPECT_LT(slow_tls_worst.load() * 1000, kHandshakeDeadlineMs + kSlowClientLagMs);
  EXPECT_LT(slow_http_worst.load() * 1000, kRequestDeadlineMs + kSlowClientLagMs);

  // Bounded memory: 1,000 connections and 512 MiB offered did not pile up.
  // (AddressSanitizer's shadow memory and quarantine triple a process's.)
#if defined(__SANITIZE_ADDRESS__)
  constexpr long kPeakRssBoundKib = 3 * 64 * 1024;
#else
  constexpr long kPeakRssBoundKib = 64 * 1024;
#endif
  const long peak = peak_rss_kib(server_.process.pid());
  EXPECT_GT(peak, 0);
  EXPECT_LT(peak, kPeakRssBoundKib) << "server peak RSS " << peak << " KiB";
  std::cerr << "server peak RSS: " << peak / 1024 << " MiB\n";
  // Still serving.
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
}

TEST_F(AbuseTest, ConnectionsOverTheCapOfOneAddressAreClosedAtOnce) {
  auto [vol, id] = enrolled_volume();
  ASSERT_FALSE(id.empty());
  // http_api.h: 128 per source address.
  std::vector<int> held;
  for (int i = 0; i < 128; ++i) {
    int fd = connect_from("127.0.0.40", server_.port);
    ASSERT_GE(fd, 0);
    held.push_back(fd);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  int over = connect_from("127.0.0.40", server_.port);
  ASSERT_GE(over, 0);
  const auto t = Clock::now();
  EXPECT_TRUE(closed_by_peer(over, 2000)) << "the 129th connection was held";
  EXPECT_LT(since(t), 1.0);
  close(over);
  // Another address, and the unlock's own, still get in.
  int other = connect_from("127.0.0.41", server_.port);
  EXPECT_FALSE(closed_by_peer(other, 300));
  close(other);
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  for (int fd : held) close(fd);
}

// The caps come from the configuration ("connections"), and the total cap
// holds across addresses.
TEST_F(AbuseTest, ConfiguredConnectionCapsHoldPerAddressAndInAll) {
  const std::string config = dir_ + "/" + unique("caps") + ".json";
  write_file(config, R"({"connections": {"per_source": 3, "max": 5}})");
  Server capped = start_server("caps", {"--config", config});
  ASSERT_GT(capped.port, 0) << read_file(capped.process.log_path());
  EXPECT_TRUE(contains(read_file(capped.process.log_path()),
                       "connections at most 5, from one address 3"));
  std::vector<int> held;
  for (int i = 0; i < 3; ++i) held.push_back(connect_from("127.0.0.50", capped.port));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  int over = connect_from("127.0.0.50", capped.port);
  EXPECT_TRUE(closed_by_peer(over, 2000)) << "the 4th connection from one address was held";
  close(over);
  for (int i = 0; i < 2; ++i) held.push_back(connect_from("127.0.0.51", capped.port));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  for (int fd : held) EXPECT_FALSE(closed_by_peer(fd, 100)) << "a connection within the caps was closed";
  int sixth = connect_from("127.0.0.52", capped.port);
  EXPECT_TRUE(closed_by_peer(sixth, 2000)) << "the 6th connection in all was held";
  close(sixth);
  for (int fd : held) close(fd);
  capped.process.stop();

  // A cap that makes no sense is refused at start, with the reason.
  for (const char* bad : {R"({"connections": {"per_source": 0}})",
                          R"({"connections": {"per_source": 10, "max": 5}})",
                          R"({"connections": {"per_sourse": 10}})",
                          R"({"connections": {"max": "many"}})"}) {
    write_file(config, bad);
    RunResult r = run({bin("keygate-server"), "serve", "--state-dir", dir_ + "/" + unique("caps-bad"),
                       "--listen", "127.0.0.1:0", "--config", config});
    EXPECT_NE(r.exit_code, 0) << bad;
    EXPECT_TRUE(contains(r.err, "connections: ")) << bad << ": " << r.err;
  }
}

// The TLS policy (http_api.cc): TLS 1.3, or TLS 1.2 with ECDHE and AEAD
// suites only; sessions resume when the client offers one.
TEST_F(AbuseTest, TlsPolicyRefusesOldProtocolsAndWeakSuites) {
  const std::string connect = "127.0.0.1:" + std::to_string(server_.port);
  auto s_client = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv = {"openssl", "s_client", "-connect", connect, "-CAfile",
                                     server_.ca(), "-verify_return_error"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return run(argv, "");
  };
  EXPECT_EQ(s_client({"-tls1_3"}).exit_code, 0);
  for (const char* suite : {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"}) {
    RunResult ok = s_client({"-tls1_2", "-cipher", suite});
    EXPECT_EQ(ok.exit_code, 0) << suite << ": " << ok.err;
  }
  // CBC, SHA-1 MACs, no forward secrecy: refused, even when the client
  // offers nothing else. Below TLS 1.2: refused (the client allowed to try).
  for (const char* suite : {"ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "AES128-GCM-SHA256"}) {
    RunResult weak = s_client({"-tls1_2", "-cipher", std::string(suite) + ":@SECLEVEL=0"});
    EXPECT_NE(weak.exit_code, 0) << suite << " was accepted: " << weak.out;
  }
  for (const char* old : {"-tls1_1", "-tls1"}) {
    RunResult r = s_client({old, "-cipher", "DEFAULT:@SECLEVEL=0"});
    EXPECT_NE(r.exit_code, 0) << old << " was accepted: " << r.out;
  }
  // Resumption: a TLS 1.2 session offered again is resumed.
  const std::string session = dir_ + "/" + unique("tls-session");
  ASSERT_EQ(s_client({"-tls1_2", "-sess_out", session}).exit_code, 0);
  RunResult resumed = s_client({"-tls1_2", "-sess_in", session});
  EXPECT_TRUE(contains(resumed.out, "Reused, TLSv1.2")) << resumed.out;
  // TLS 1.3: one ticket per connection (the client waits a second for it,
  // as it comes after the handshake), and it resumes.
  const std::string s_client13 = "openssl s_client -connect " + connect + " -CAfile '" + server_.ca() +
                                 "' -verify_return_error -tls1_3 ";
  RunResult first = run({"sh", "-c", "sleep 1 | " + s_client13 + "-sess_out '" + session + "13'"});
  ASSERT_EQ(first.exit_code, 0) << first.err;
  size_t tickets = 0;
  for (size_t at = first.out.find("New Session Ticket"); at != std::string::npos;
       at = first.out.find("New Session Ticket", at + 1)) {
    ++tickets;
  }
  EXPECT_EQ(tickets, 1u) << first.out;
  RunResult again = run({"sh", "-c", "sleep 1 | " + s_client13 + "-sess_in '" + session + "13'"});
  EXPECT_TRUE(contains(again.out, "Reused, TLSv1.3")) << again.out;
}

// Out of descriptors, accept() fails at once, every time: the server must
// wait rather than spin, and serve again when connections close.
TEST_F(AbuseTest, RunningOutOfDescriptorsNeitherSpinsNorStopsTheServer) {
#if defined(__SANITIZE_ADDRESS__)
  // The sanitizer runtime opens a pipe to check memory it reports on; with
  // no descriptor left it reports valid objects as invalid ("memory cannot
  // be printed") and stops the server. The normal and release passes run it.
  GTEST_SKIP() << "needs file descriptors the sanitizer runtime would not have";
#endif
  const std::string state = dir_ + "/" + unique("few-fds");
  const std::string port_file = state + ".port";
  Background server({"prlimit", "--nofile=64:64", "--", bin("keygate-server"), "serve",
                     "--state-dir", state, "--listen", "127.0.0.1:0", "--port-file", port_file,
                     "--aws-trust-dir", dir_ + "/emu/aws-trust"},
                    state + ".log");
  const int port = wait_for_port_file(port_file, server);
  ASSERT_GT(port, 0) << read_file(state + ".log");
  auto cpu_seconds = [&] {
    std::ifstream in("/proc/" + std::to_string(server.pid()) + "/stat");
    std::string line;
    std::getline(in, line);
    std::istringstream fields(line.substr(line.rfind(')') + 2));
    std::string f;
    long utime = 0, stime = 0;
    for (int i = 3; i <= 15 && fields >> f; ++i) {
      if (i == 14) utime = std::stol(f);
      if (i == 15) stime = std::stol(f);
    }
    return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
  };
  // More idle connections than the server has descriptors.
  std::vector<int> idle;
  for (int i = 0; i < 100; ++i) {
    int fd = connect_from("127.0.0." + std::to_string(50 + i / 50), port);
    if (fd >= 0) idle.push_back(fd);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const double before = cpu_seconds();
  std::this_thread::sleep_for(std::chrono::seconds(2));
  const double spent = cpu_seconds() - before;
  EXPECT_LT(spent, 0.5) << "the server spun on accept() for " << spent << " s of 2";
  EXPECT_TRUE(contains(read_file(state + ".log"), "accept: ")) << read_file(state + ".log");
  for (int fd : idle) close(fd);
  // Serving again: a challenge over TLS.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  httplib::SSLClient cli("127.0.0.1", port);
  cli.set_ca_cert_path((state + "/ca.pem").c_str());
  cli.enable_server_certificate_verification(true);
  auto res = cli.Post(api::kChallengePath, "{}", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  server.stop();
}

}  // namespace
}  // namespace keygate::testing
