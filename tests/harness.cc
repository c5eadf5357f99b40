#include "harness.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <thread>

namespace keygate::testing {

std::string bin(const std::string& name) { return std::string(KEYGATE_BIN_DIR) + "/" + name; }

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

// Forks and execs argv with stdin, stdout and stderr from the given paths.
pid_t spawn(const std::vector<std::string>& argv, const std::string& in, const std::string& out,
            const std::string& err, int out_flags) {
  pid_t pid = fork();
  if (pid == 0) {
    int in_fd = open(in.c_str(), O_RDONLY);
    int out_fd = open(out.c_str(), O_WRONLY | O_CREAT | out_flags, 0600);
    int err_fd = out == err ? out_fd : open(err.c_str(), O_WRONLY | O_CREAT | out_flags, 0600);
    dup2(in_fd, 0);
    dup2(out_fd, 1);
    dup2(err_fd, 2);
    auto args = c_argv(argv);
    execvp(args[0], args.data());
    _exit(127);
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
  int status = 0;
  waitpid(pid, &status, 0);
  RunResult r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = read_file(out_path);
  r.err = read_file(err_path);
  std::string cmd = "rm -rf '" + dir + "'";
  if (system(cmd.c_str()) != 0) {
    // Leftover temp files are harmless; the result stands.
  }
  return r;
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

}  // namespace keygate::testing
