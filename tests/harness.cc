#include "harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>
#include <thread>

namespace keygate::testing {

std::string bin(const std::string& name) {
  // KEYGATE_UNLOCKER runs the suite against another keygate binary (the
  // static release build: scripts/test.sh); the servers stay this build's.
  if (name == "keygate") {
    const char* other = std::getenv("KEYGATE_UNLOCKER");
    if (other != nullptr && *other != '\0') return other;
  }
  return std::string(KEYGATE_BIN_DIR) + "/" + name;
}

std::string make_temp_dir(const std::string& prefix) {
  std::string tmpl = "/tmp/" + prefix + "-XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  return tmpl;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
}

namespace {

std::vector<char*> c_argv(const std::vector<std::string>& argv) {
  std::vector<char*> out;
  for (const auto& a : argv) out.push_back(const_cast<char*>(a.c_str()));
  out.push_back(nullptr);
  return out;
}

// Starts argv with stdin, stdout and stderr from the given paths. Tests
// start programs from several threads at once (an unlock waiting on a thread
// while the main thread runs admin commands), so nothing may run between a
// fork and the exec that could wait on a lock another thread held at the
// fork: a sanitizer's allocator lock held that way hung a child forever
// (building argv in the child). posix_spawnp allocates nothing in the child.
// -1 if the program could not be started.
pid_t spawn(const std::vector<std::string>& argv, const std::string& in, const std::string& out,
            const std::string& err, int out_flags) {
  auto args = c_argv(argv);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, in.c_str(), O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, out.c_str(), O_WRONLY | O_CREAT | out_flags, 0600);
  if (out == err) {
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
  } else {
    posix_spawn_file_actions_addopen(&actions, 2, err.c_str(), O_WRONLY | O_CREAT | out_flags,
                                     0600);
  }
  pid_t pid = -1;
  const int rc = posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    fprintf(stderr, "posix_spawnp %s: %s\n", argv[0].c_str(), std::strerror(rc));
    return -1;
  }
  return pid;
}

}  // namespace

RunResult run(const std::vector<std::string>& argv, const std::string& input) {
  std::string dir = make_temp_dir("keygate-run");
  std::string in_path = dir + "/in", out_path = dir + "/out", err_path = dir + "/err";
  write_file(in_path, input);
  auto start = std::chrono::steady_clock::now();
  pid_t pid = spawn(argv, in_path, out_path, err_path, O_TRUNC);
  int status = 127 << 8;  // as a shell says of a command it could not start
  if (pid > 0) waitpid(pid, &status, 0);
  RunResult r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = read_file(out_path);
  r.err = read_file(err_path);
  remove_test_dir(dir, false);
  return r;
}

void remove_test_dir(const std::string& dir, bool failed) {
  if (failed) {
    fprintf(stderr, "test files kept in %s\n", dir.c_str());
    return;
  }
  // Leftover temp files are harmless; a failure to remove them is not one.
  [[maybe_unused]] int rc = system(("rm -rf '" + dir + "'").c_str());
}

Background::Background(const std::vector<std::string>& argv, const std::string& log_path)
    : pid_(spawn(argv, "/dev/null", log_path, log_path, O_APPEND)), log_(log_path) {}

Background::~Background() { stop(); }

Background::Background(Background&& other) noexcept : pid_(other.pid_), log_(other.log_) {
  other.pid_ = -1;
}

Background& Background::operator=(Background&& other) noexcept {
  if (this != &other) {
    stop();
    pid_ = other.pid_;
    log_ = other.log_;
    other.pid_ = -1;
  }
  return *this;
}

void Background::stop() {
  if (pid_ <= 0) return;
  kill(pid_, SIGTERM);
  for (int i = 0; i < 100; ++i) {
    int status;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

int wait_for_port_file(const std::string& path, const Background& process) {
  for (int i = 0; i < 200 && process.running(); ++i) {
    std::string text = read_file(path);
    if (!text.empty() && text.back() == '\n') return std::stoi(text);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return 0;
}

namespace {

// Binds (free?) or connects to (answering?) 127.0.0.1:port.
bool loopback(int port, bool connect_to) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  auto* addr = reinterpret_cast<sockaddr*>(&a);
  bool ok = (connect_to ? connect(fd, addr, sizeof(a)) : bind(fd, addr, sizeof(a))) == 0;
  close(fd);
  return ok;
}

bool port_free(int port) { return loopback(port, false); }
bool port_answers(int port) { return loopback(port, true); }

}  // namespace

Swtpm start_swtpm(const std::string& state_dir) {
  mkdir(state_dir.c_str(), 0700);
  static std::mt19937 rng(std::random_device{}());
  for (int attempt = 0; attempt < 10; ++attempt) {
    int port = std::uniform_int_distribution<int>(20000, 60000)(rng) & ~1;
    if (!port_free(port) || !port_free(port + 1)) continue;
    Swtpm t;
    t.process = Background(
        {"swtpm", "socket", "--tpm2", "--server",
         "type=tcp,port=" + std::to_string(port) + ",bindaddr=127.0.0.1", "--ctrl",
         "type=tcp,port=" + std::to_string(port + 1) + ",bindaddr=127.0.0.1", "--tpmstate",
         "dir=" + state_dir, "--flags", "not-need-init,startup-clear"},
        state_dir + ".log");
    for (int i = 0; i < 100 && t.process.running(); ++i) {
      // The control port opens once the TPM is ready for commands.
      if (port_answers(port + 1)) {
        t.port = port;
        return t;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    t.process.stop();
  }
  return Swtpm{};
}

}  // namespace keygate::testing
