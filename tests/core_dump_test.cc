// A core of `keygate unlock` holds no volume secret: taken with gdb's gcore
// (which, like the kernel, leaves out mappings marked MADV_DONTDUMP) right
// after the released secret opened the keyslot, and again as the process
// exits. The same core with the excluded mappings put back must hold the
// secret (it is in memory then, where the kernel would not dump it), so the
// search is shown to find it; at exit it is nowhere, dumped or not.
#include <sys/stat.h>

#include "core/encoding.h"
#include "server/key_service.h"
#include "server/state_files.h"
#include "server/store.h"
#include "tests/keygate_fixture.h"

namespace keygate::testing {
namespace {

// The volume's secret as the server holds it: sealed in the store, under the KEK.
std::string volume_secret(const std::string& state, const std::string& id) {
  auto store = KeygateTest::open_store_of(state);
  if (store == nullptr) return "";
  auto record = store->get_volume(id);
  EXPECT_TRUE(record.is_ok());
  auto kek = server::load_or_create_kek(state + "/kek");
  EXPECT_TRUE(kek.is_ok());
  auto secret = server::open_volume_secret(kek.value(), record->sealed_secret, id);
  EXPECT_TRUE(secret.is_ok());
  return std::string(reinterpret_cast<const char*>(secret->data()), secret->size());
}

TEST_F(KeygateTest, NoCoreOfTheUnlockerHoldsTheVolumeSecret) {
#ifdef KEYGATE_SANITIZED
  // AddressSanitizer's shadow and quarantine are not the shipped binary's
  // memory: gcore cannot read the shadow's terabytes of reserved space, and
  // freed blocks sit in quarantine unreused. The question is about the
  // binary that ships; the RelWithDebInfo and release passes answer it.
  GTEST_SKIP() << "a sanitized unlocker's core is not the shipped binary's";
#endif
  auto [vol, id] = enrolled_volume();
  ASSERT_FALSE(id.empty());
  const std::string secret = volume_secret(server_.state, id);
  ASSERT_EQ(secret.size(), api::kVolumeSecretSize);
  const std::string cores = dir_ + "/" + unique("cores");
  ASSERT_EQ(mkdir(cores.c_str(), 0700), 0);
  RunResult r = run({"gdb", "-batch", "-nx",
                     "-ex", "set pagination off",
                     "-ex", "set breakpoint pending on",
                     "-ex", "break crypt_activate_by_passphrase",
                     "-ex", "run",
                     "-ex", "finish",
                     "-ex", "gcore " + cores + "/activated",
                     "-ex", "set dump-excluded-mappings on",
                     "-ex", "gcore " + cores + "/activated-everything",
                     "-ex", "delete",
                     "-ex", "catch syscall exit_group",
                     "-ex", "continue",
                     "-ex", "gcore " + cores + "/exit-everything",
                     "-ex", "set dump-excluded-mappings off",
                     "-ex", "gcore " + cores + "/exit",
                     "-ex", "continue",
                     "--args", bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url",
                     emulator_.url(), "--timeout", "20"});
  ASSERT_TRUE(contains(r.out, "opens keyslot")) << r.out << r.err;
  ASSERT_TRUE(contains(r.out, "exited normally")) << r.out << r.err;
  const std::string b64 = base64_encode(secret);
  const std::string hex = hex_encode(to_bytes(secret));
  for (const char* name : {"activated", "activated-everything", "exit", "exit-everything"}) {
    const std::string core = read_file(cores + "/" + name);
    ASSERT_GT(core.size(), 1u << 20) << name << ": " << r.out << r.err;
    // The core is of this unlock: the volume id it asked for is in it.
    EXPECT_TRUE(contains(core, id)) << name;
    const bool secret_in_core = contains(core, secret);
    if (std::string(name) == "activated-everything") {
      EXPECT_TRUE(secret_in_core) << "the secret should be in the excluded mappings while in use";
    } else {
      EXPECT_FALSE(secret_in_core) << name << ": the volume secret is in the core";
    }
    EXPECT_FALSE(contains(core, b64)) << name << ": the secret's base64 is in the core";
    EXPECT_FALSE(contains(core, hex)) << name << ": the secret's hex is in the core";
  }
}

}  // namespace
}  // namespace keygate::testing
