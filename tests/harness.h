// Process helpers for integration tests: run a command to completion, or
// keep a server running in the background for the length of a test.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

namespace keygate::testing {

struct RunResult {
  int exit_code = -1;
  std::string out;
  std::string err;
  double seconds = 0;
};

std::string bin(const std::string& name);     // a built keygate binary
std::string make_temp_dir(const std::string& prefix);
// Removes `dir`, or keeps it (and says where) when `failed`: the files of a
// failed test are what its reader needs.
void remove_test_dir(const std::string& dir, bool failed);
std::string read_file(const std::string& path);
void write_file(const std::string& path, const std::string& data);

// Runs argv[0] (searched in PATH if it has no slash) with `input` on stdin.
RunResult run(const std::vector<std::string>& argv, const std::string& input = "");

class Background {
 public:
  Background() = default;
  // Starts argv with stdout and stderr appended to `log_path`.
  Background(const std::vector<std::string>& argv, const std::string& log_path);
  ~Background();
  Background(Background&& other) noexcept;
  Background& operator=(Background&& other) noexcept;
  Background(const Background&) = delete;
  Background& operator=(const Background&) = delete;

  // SIGTERM, then SIGKILL after 5 s; waits for exit.
  void stop();
  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_; }

 private:
  pid_t pid_ = -1;
  std::string log_;
};

// Waits (up to 10 s) for a port file written by a server; returns the port or
// 0 if it never appeared.
int wait_for_port_file(const std::string& path, const Background& process);

// A software TPM (swtpm, socket interface) on 127.0.0.1 at a random free
// port, its state in `state_dir` (created; reused if it exists, so the same
// folder is the same TPM).
struct Swtpm {
  Background process;
  int port = 0;  // the TPM command port; the control port is port + 1
  std::string tcti() const { return "swtpm:host=127.0.0.1,port=" + std::to_string(port); }
};
Swtpm start_swtpm(const std::string& state_dir);

}  // namespace keygate::testing
