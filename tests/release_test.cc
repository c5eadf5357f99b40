// The static release keygate needs nothing beside it: it runs, and unlocks
// a volume against a real server over TLS, inside a root that holds only the
// binary, the volume file, /dev/urandom and /dev/random (libcryptsetup opens
// both for its random source): no libc, no libraries, no /etc, no /proc. The key servers'
// CA travels in the volume's LUKS2 token.
//
// Runs when KEYGATE_UNLOCKER names the release binary (scripts/test.sh's
// second pass over the integration suite); chroot needs root.
#include <gtest/gtest.h>

#include <dirent.h>
#include <unistd.h>

#include <cstdlib>
#include <set>
#include <string>

#include "harness.h"

namespace keygate::testing {
namespace {

std::set<std::string> entries(const std::string& dir) {
  std::set<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) {
    std::string name = e->d_name;
    if (name != "." && name != "..") out.insert(name);
  }
  closedir(d);
  return out;
}

TEST(ReleaseKeygate, UnlocksInsideAnEmptyRoot) {
  const char* unlocker = std::getenv("KEYGATE_UNLOCKER");
  if (unlocker == nullptr || *unlocker == '\0') {
    GTEST_SKIP() << "needs KEYGATE_UNLOCKER naming the static release keygate (scripts/test.sh)";
  }
  if (geteuid() != 0) GTEST_SKIP() << "chroot needs root";

  std::string dir = make_temp_dir("keygate-release");
  std::string emu_state = dir + "/emu";
  std::string srv_state = dir + "/srv";
  ASSERT_EQ(run({bin("keygate-metadata-emulator"), "init", "--state-dir", emu_state}).exit_code, 0);
  Background emu({bin("keygate-metadata-emulator"), "serve", "--state-dir", emu_state, "--listen",
                  "127.0.0.1:0", "--port-file", dir + "/emu.port"},
                 dir + "/emu.log");
  Background srv({bin("keygate-server"), "serve", "--state-dir", srv_state, "--listen",
                  "127.0.0.1:0", "--port-file", dir + "/srv.port", "--aws-trust-dir",
                  emu_state + "/aws-trust"},
                 dir + "/srv.log");
  int emu_port = wait_for_port_file(dir + "/emu.port", emu);
  int srv_port = wait_for_port_file(dir + "/srv.port", srv);
  ASSERT_GT(emu_port, 0) << read_file(dir + "/emu.log");
  ASSERT_GT(srv_port, 0) << read_file(dir + "/srv.log");
  std::string metadata = "http://127.0.0.1:" + std::to_string(emu_port);

  RunResult token = run({bin("keygate-server"), "token", "create", "--state-dir", srv_state});
  ASSERT_EQ(token.exit_code, 0) << token.err;
  write_file(dir + "/token", token.out);

  // The root: the binary and a volume enrolled with it (from outside).
  std::string root = dir + "/root";
  ASSERT_EQ(run({"mkdir", "-m", "0755", root}).exit_code, 0);
  ASSERT_EQ(run({"cp", unlocker, root + "/keygate"}).exit_code, 0);
  ASSERT_EQ(run({"truncate", "-s", "32M", root + "/volume.img"}).exit_code, 0);
  RunResult enroll = run({unlocker, "enroll", root + "/volume.img", "--format", "--no-recovery",
                          "--server", "https://127.0.0.1:" + std::to_string(srv_port), "--ca",
                          srv_state + "/ca.pem", "--enrollment-token-file", dir + "/token",
                          "--metadata-url", metadata});
  ASSERT_EQ(enroll.exit_code, 0) << enroll.err;
  ASSERT_EQ(run({"mkdir", "-m", "0755", root + "/dev"}).exit_code, 0);
  ASSERT_EQ(run({"mknod", "-m", "0444", root + "/dev/urandom", "c", "1", "9"}).exit_code, 0);
  ASSERT_EQ(run({"mknod", "-m", "0444", root + "/dev/random", "c", "1", "8"}).exit_code, 0);
  const std::set<std::string> contents = {"keygate", "volume.img", "dev"};
  ASSERT_EQ(entries(root), contents);

  RunResult version = run({"chroot", root, "/keygate", "--version"});
  EXPECT_EQ(version.exit_code, 0) << version.err;
  EXPECT_NE(version.out.find("(static release build)"), std::string::npos) << version.out;

  RunResult unlock = run({"chroot", root, "/keygate", "unlock", "/volume.img", "--verify-only",
                          "--metadata-url", metadata});
  EXPECT_EQ(unlock.exit_code, 0) << unlock.out << unlock.err;
  EXPECT_NE((unlock.out + unlock.err).find("key from server opens keyslot"), std::string::npos)
      << unlock.out << unlock.err;
  // Nothing was created inside the root but the device-mapper folder, which
  // libdevmapper makes when libcryptsetup starts it.
  EXPECT_EQ(entries(root), contents);
  std::set<std::string> dev = entries(root + "/dev");
  dev.erase("mapper");
  EXPECT_EQ(dev, (std::set<std::string>{"random", "urandom"}));

  srv.stop();
  emu.stop();
  remove_test_dir(dir, ::testing::Test::HasFailure());
}

}  // namespace
}  // namespace keygate::testing
