// The release path from each of its entry points: `keygate unlock`,
// `keygate keyscript` and the LUKS2 token plugin inside the real cryptsetup
// behave the same against the same server (same classification, same
// deadline semantics); and no command sends anything to an http:// key
// server (fixture: keygate_fixture.h).
#include "tests/keygate_fixture.h"

namespace keygate::testing {
namespace {

enum class Entry { kUnlock, kKeyscript, kPlugin };

const char* entry_name(Entry e) {
  switch (e) {
    case Entry::kUnlock: return "keygate unlock";
    case Entry::kKeyscript: return "keygate keyscript";
    case Entry::kPlugin: return "cryptsetup open --token-only";
  }
  return "?";
}

class EntryPointsTest : public KeygateTest {
 protected:
  // Runs `entry` on `volume` with the metadata service at `metadata_url` and
  // a deadline of `deadline` seconds.
  RunResult run_entry(Entry entry, const std::string& volume, const std::string& metadata_url,
                      int deadline) {
    const std::string d = std::to_string(deadline);
    switch (entry) {
      case Entry::kUnlock:
        return run({bin("keygate"), "unlock", volume, "--verify-only", "--metadata-url",
                    metadata_url, "--deadline", d});
      case Entry::kKeyscript:
        return run({bin("keygate"), "keyscript", volume, "--metadata-url", metadata_url,
                    "--deadline", d});
      case Entry::kPlugin:
        return cryptsetup_with_plugin(
            "open --test-passphrase --token-only -v '" + volume + "'",
            "KEYGATE_DEADLINE=" + d + " KEYGATE_METADATA_URL=" + metadata_url);
    }
    return {};
  }

  // Did the key this entry point got open the volume?
  bool opened(Entry entry, const RunResult& r, const std::string& volume) {
    switch (entry) {
      case Entry::kUnlock: return r.exit_code == 0 && contains(r.out, "opens keyslot");
      case Entry::kKeyscript: {
        const std::string key_file = dir_ + "/" + unique("key");
        write_file(key_file, r.out);
        return r.exit_code == 0 && r.out.size() == api::kVolumeSecretSize &&
               run({"cryptsetup", "open", "--test-passphrase", "--key-file", key_file, volume})
                       .exit_code == 0;
      }
      case Entry::kPlugin: return r.exit_code == 0 && contains(r.out, "Key slot 0 unlocked");
    }
    return false;
  }
};

constexpr Entry kEntries[] = {Entry::kUnlock, Entry::kKeyscript, Entry::kPlugin};

TEST_F(EntryPointsTest, UnlockKeyscriptAndTokenPluginBehaveTheSame) {
  auto [vol, id] = enrolled_volume();
  ASSERT_FALSE(id.empty());
  // Another instance of the same account: the server refuses it.
  Identity stranger;
  stranger.instance = "i-0ccccccccccccccc9";
  Emulator other = start_emulator(stranger, dir_ + "/emu");
  ASSERT_GT(other.port, 0);

  for (Entry e : kEntries) {
    SCOPED_TRACE(entry_name(e));
    // Refused: the answer is final, a deadline of 60 s or not (no retry).
    RunResult refused = run_entry(e, vol, other.url(), 60);
    EXPECT_NE(refused.exit_code, 0);
    // cryptsetup's own exit status says only that the token failed; the
    // plugin's log says how, in the command's terms.
    if (e == Entry::kPlugin) {
      EXPECT_TRUE(contains(refused.err, "(refused, keygate's exit status 3)")) << refused.err;
    } else {
      EXPECT_EQ(refused.exit_code, kExitRefused) << refused.err;
    }
    EXPECT_TRUE(contains(refused.err, "HTTP 403 policy_denied")) << refused.err;
    EXPECT_FALSE(contains(refused.err, "retrying")) << refused.err;
    EXPECT_LT(refused.seconds, 30.0);
    EXPECT_FALSE(opened(e, refused, vol));
    if (e == Entry::kKeyscript) {
      EXPECT_EQ(refused.out, "");
    }
    // Released to the instance the volume is bound to.
    RunResult released = run_entry(e, vol, emulator_.url(), 60);
    EXPECT_TRUE(opened(e, released, vol)) << released.out << released.err;
  }

  // Unreachable: each retries until the same deadline, then hands over.
  server_.process.stop();
  for (Entry e : kEntries) {
    SCOPED_TRACE(entry_name(e));
    RunResult down = run_entry(e, vol, emulator_.url(), 3);
    EXPECT_NE(down.exit_code, 0);
    if (e == Entry::kPlugin) {
      EXPECT_TRUE(contains(down.err, "(unreachable, keygate's exit status 4)")) << down.err;
    } else {
      EXPECT_EQ(down.exit_code, kExitUnreachable) << down.err;
    }
    EXPECT_TRUE(contains(down.err, "retrying in")) << down.err;
    EXPECT_TRUE(contains(down.err, "deadline of 3 s reached")) << down.err;
    EXPECT_GE(down.seconds, 2.0);
    EXPECT_LT(down.seconds, 8.0);
  }
}

TEST_F(EntryPointsTest, SettingsComeFromTheSameVariablesAndMalformedOnesAreRefused) {
  auto [vol, id] = enrolled_volume();
  ASSERT_FALSE(id.empty());
  // The command line reads the plugin's variables too (an option wins).
  RunResult from_env = run({"env", "KEYGATE_METADATA_URL=" + emulator_.url(), bin("keygate"),
                            "unlock", vol, "--verify-only"});
  EXPECT_EQ(from_env.exit_code, 0) << from_env.err;
  for (const std::string& bad : {std::string("--timeout=0"), std::string("--timeout=5s"),
                                 std::string("--deadline=-1"), std::string("--deadline=soon"),
                                 std::string("--platform=openstack")}) {
    RunResult r = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url",
                       emulator_.url(), bad});
    EXPECT_EQ(r.exit_code, kExitUsage) << bad << ": " << r.err;
    EXPECT_TRUE(contains(r.err, bad.substr(0, bad.find('=')))) << bad << ": " << r.err;
  }
  RunResult env_bad = run({"env", "KEYGATE_DEADLINE=forever", bin("keygate"), "unlock", vol,
                           "--verify-only", "--metadata-url", emulator_.url()});
  EXPECT_EQ(env_bad.exit_code, kExitUsage) << env_bad.err;
  EXPECT_TRUE(contains(env_bad.err, "KEYGATE_DEADLINE")) << env_bad.err;
  RunResult plugin_bad = cryptsetup_with_plugin("open --test-passphrase --token-only '" + vol + "'",
                                                "KEYGATE_DEADLINE=forever KEYGATE_METADATA_URL=" +
                                                    emulator_.url());
  EXPECT_NE(plugin_bad.exit_code, 0);
  EXPECT_TRUE(contains(plugin_bad.err, "KEYGATE_DEADLINE")) << plugin_bad.err;
  // An option a command does not take is named, not ignored.
  RunResult stray = run({bin("keygate"), "unlock", vol, "--verify-only", "--format"});
  EXPECT_EQ(stray.exit_code, kExitUsage);
  EXPECT_TRUE(contains(stray.err, "unlock does not take --format")) << stray.err;
}

// The plugin runs unattended at boot (systemd-cryptsetup, no settings but
// what its unit gives): without KEYGATE_DEADLINE it must wait for a key
// server that is not up yet, as the cloud-init boot does.
TEST_F(EntryPointsTest, TokenPluginWaitsForAKeyServerThatComesUpLate) {
  DownServer late = enrolled_then_down("late");
  std::thread restart = restart_later(late, 3000);
  RunResult opened = cryptsetup_with_plugin("open --test-passphrase --token-only -v '" + late.volume + "'",
                                            "KEYGATE_METADATA_URL=" + emulator_.url());
  restart.join();
  EXPECT_EQ(opened.exit_code, 0) << opened.err;
  EXPECT_TRUE(contains(opened.err, "retrying in")) << opened.err;
  late.server.process.stop();
}

int listen_on_loopback(int* port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(fd, 16) != 0) {
    return -1;
  }
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  *port = ntohs(addr.sin_port);
  return fd;
}

TEST_F(EntryPointsTest, EveryCommandRefusesAnHttpKeyServerBeforeAnyTraffic) {
  auto [vol, id] = enrolled_volume();
  ASSERT_FALSE(id.empty());
  // A plain TCP listener: any connection to it is traffic a command sent.
  int port = 0;
  const int listener = listen_on_loopback(&port);
  ASSERT_GE(listener, 0);
  const std::string http = "http://127.0.0.1:" + std::to_string(port);
  const std::string token = make_token(server_);
  const std::string recovery = dir_ + "/" + unique("recovery");
  write_file(recovery, "correct horse battery staple");
  const std::string image = new_volume_file();
  ASSERT_EQ(run({"mkfs.ext4", "-q", image}).exit_code, 0);
  auto audit_lines = [&] {
    return run({bin("keygate-server"), "audit", "--state-dir", server_.state, "--limit", "1000"}).out;
  };
  const std::string audit_before = audit_lines();
  const std::string blank = new_volume_file();
  const std::vector<std::string> common = {"--ca", server_.ca(), "--enrollment-token-file", token,
                                           "--metadata-url", emulator_.url()};
  struct Case {
    std::vector<std::string> argv;
  };
  std::vector<Case> cases = {
      {{"rotate", vol, "--server", http}},
      {{"rotate", vol, "--token-server", http}},
      {{"enroll", blank, "--format", "--no-recovery", "--server", http}},
      {{"enroll", blank, "--format", "--no-recovery", "--server", server_.url(), "--token-server", http}},
      {{"encrypt", image, "--recovery-passphrase-file", recovery, "--server", http}},
  };
  for (auto& c : cases) {
    std::vector<std::string> argv = {bin("keygate")};
    argv.insert(argv.end(), c.argv.begin(), c.argv.end());
    argv.insert(argv.end(), common.begin(), common.end());
    RunResult r = run(argv);
    EXPECT_EQ(r.exit_code, kExitUsage) << c.argv[0] << ": " << r.err;
    EXPECT_TRUE(contains(r.err, "'" + http + "'")) << r.err;
    EXPECT_TRUE(contains(r.err, "must be an https:// URL")) << r.err;
  }
  // Nothing reached the listener, nor the real server (no key released,
  // nothing registered), and nothing on the volumes changed.
  EXPECT_LT(accept(listener, nullptr, nullptr), 0);
  EXPECT_EQ(errno, EAGAIN);
  close(listener);
  EXPECT_EQ(audit_lines(), audit_before);
  RunResult status = run({bin("keygate"), "status", vol, "--json"});
  EXPECT_TRUE(contains(status.out, id)) << status.out;
  EXPECT_NE(run({"cryptsetup", "isLuks", blank}).exit_code, 0);
  EXPECT_NE(run({"cryptsetup", "isLuks", image}).exit_code, 0);
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
}

}  // namespace
}  // namespace keygate::testing
