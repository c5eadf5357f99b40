// The server under bad input and a failing audit trail, and every way a
// volume is enrolled: tokens, image groups, --format, encrypt, attestation
// (fixture: keygate_fixture.h).
#include "tests/keygate_fixture.h"

#include <json/reader.h>

#include "core/encoding.h"
#include "tests/fault_proxy.h"
#include "server/store.h"

#include <mutex>
#include <sstream>

namespace keygate::testing {
namespace {

TEST_F(KeygateTest, OversizedAndMalformedBodiesGet400AndServerKeepsServing) {
  auto cli = api_client(server_);
  std::string huge(api::kMaxRequestBody + 1024, 'x');
  auto big = cli->Post(api::kUnlockPath, huge, "application/json");
  ASSERT_TRUE(big);
  EXPECT_EQ(big->status, 400);
  EXPECT_TRUE(contains(big->body, "request_too_large")) << big->body;

  for (const std::string& body :
       {std::string("{not json"), std::string("[]"), std::string("{\"volume_id\":5}"),
        std::string("{\"volume_id\":\"../x\",\"nonce\":\"AA==\"}"),
        std::string("{\"volume_id\":\"abc\",\"nonce\":\"!!\",\"client_public_key\":\"\"}"),
        std::string("\x00\x01\x02", 3)}) {
    auto r = api_client(server_)->Post(api::kUnlockPath, body, "application/json");
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 400) << body;
    EXPECT_TRUE(parse_json_object(r->body).is_ok()) << r->body;
    EXPECT_TRUE(contains(r->body, "\"error\""));
  }
  auto reg = api_client(server_)->Post(api::kEnrollRegisterPath, "{}", "application/json");
  ASSERT_TRUE(reg);
  EXPECT_EQ(reg->status, 400);
  // A client's words in a refusal's detail: an evidence platform named with
  // a terminal escape and a newline, as if to forge an "unlock released".
  Json::Value forged;
  forged[api::field::kNonce] = base64_encode(fresh_nonce(server_));
  forged[api::field::kClientPublicKey] = base64_encode(Bytes(32, 9));
  forged[api::field::kEvidence]["\x1b[2J\n2026-01-01T00:00:00Z unlock released"] = Json::Value(Json::objectValue);
  auto forged_res = api_client(server_)->Post(api::kEnrollRegisterPath, to_json(forged), "application/json");
  ASSERT_TRUE(forged_res);
  EXPECT_EQ(forged_res->status, 403) << forged_res->body;
  // Each refusal is one line of the audit view, escaped: what a client sent
  // cannot forge a record or reach the terminal.
  RunResult audit = run({bin("keygate-server"), "audit", "--state-dir", server_.state});
  ASSERT_EQ(audit.exit_code, 0);
  std::istringstream lines(audit.out);
  int records = 0;
  for (std::string line; std::getline(lines, line); ++records) {
    EXPECT_TRUE(std::regex_search(line, std::regex("^\\d{4}-\\d{2}-\\d{2}T"))) << line;
    for (unsigned char c : line) EXPECT_TRUE(c >= 0x20 && c < 0x7f) << line;
  }
  EXPECT_GE(records, 8) << audit.out;
  EXPECT_TRUE(contains(audit.out, "\\x1b[2J\\x0a")) << audit.out;
  // Still serving.
  EXPECT_EQ(fresh_nonce(server_).size(), api::kNonceSize);
  auto [vol, id] = enrolled_volume();
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
}

TEST_F(KeygateTest, RevokedVolumeIsRefused) {
  auto [vol, id] = enrolled_volume();
  ASSERT_EQ(unlock(vol, emulator_).exit_code, 0);
  RunResult revoke =
      run({bin("keygate-server"), "volumes", "revoke", id, "--state-dir", server_.state});
  ASSERT_EQ(revoke.exit_code, 0) << revoke.err;
  RunResult r = unlock(vol, emulator_);
  EXPECT_EQ(r.exit_code, kExitRefused) << r.err;
  EXPECT_TRUE(contains(r.err, "revoked")) << r.err;
  RunResult list = run({bin("keygate-server"), "volumes", "list", "--state-dir", server_.state});
  EXPECT_TRUE(contains(list.out, "revoked"));
}

// Every release is in the audit log before the key leaves: while the log
// cannot be written (here another writer holds the database, as a stuck
// process or a full disk would make it), nothing is released.
TEST_F(KeygateTest, NoKeyIsReleasedWhileTheAuditLogCannotBeWritten) {
  auto [vol, id] = enrolled_volume();
  sqlite3* db = nullptr;
  if (on_postgres()) {
    // Every insert into the trail fails, as on a full disk.
    ASSERT_EQ(store_sql(server_.state,
                        "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$BEGIN RAISE EXCEPTION 'disk full'; END$$; "
                        "CREATE TRIGGER full_disk BEFORE INSERT ON audit FOR EACH ROW EXECUTE "
                        "FUNCTION disk_full()"),
              "");
  } else {
    ASSERT_EQ(sqlite3_open((server_.state + "/keygate.db").c_str(), &db), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(db, "BEGIN EXCLUSIVE", nullptr, nullptr, nullptr), SQLITE_OK);
  }
  // The server waits 5 s for the lock before it gives up on the write.
  RunResult held = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url",
                        emulator_.url(), "--timeout", "20"});
  if (on_postgres()) {
    ASSERT_EQ(store_sql(server_.state, "DROP TRIGGER full_disk ON audit"), "");
  } else {
    ASSERT_EQ(sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr), SQLITE_OK);
    sqlite3_close(db);
  }
  EXPECT_EQ(held.exit_code, kExitUnreachable) << held.err;
  EXPECT_TRUE(contains(held.err, "audit_unavailable")) << held.err;
  EXPECT_FALSE(contains(held.out, "opens keyslot")) << held.out;
  EXPECT_TRUE(contains(read_file(server_.process.log_path()),
                       "not sent, the audit log cannot be written"));

  // Once the log can be written again, the same volume unlocks, on the record.
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  RunResult audit = run({bin("keygate-server"), "audit", "--state-dir", server_.state});
  EXPECT_TRUE(contains(audit.out, "unlock released volume=" + id)) << audit.out;
}

TEST_F(KeygateTest, EnrollmentTokenIsSingleUseAndBoundToItsAccount) {
  std::string token = make_token(server_);
  std::string a = new_volume_file(), b = new_volume_file();
  ASSERT_EQ(enroll_format(a, server_, token, emulator_).exit_code, 0);
  RunResult reuse = enroll_format(b, server_, token, emulator_);
  EXPECT_EQ(reuse.exit_code, kExitRefused) << reuse.err;
  EXPECT_TRUE(contains(reuse.err, "enrollment_token_invalid")) << reuse.err;
  // Nothing was written to the blank device.
  EXPECT_TRUE(unlocker::check_device_blank(b).is_ok());

  std::string other_account = make_token(server_, {"--account", "444455556666"});
  RunResult wrong = enroll_format(b, server_, other_account, emulator_);
  EXPECT_EQ(wrong.exit_code, kExitRefused) << wrong.err;
  EXPECT_TRUE(unlocker::check_device_blank(b).is_ok());
}

TEST_F(KeygateTest, ImageGroupVolumeEnrolledOfflineOpensOnAnyInstanceOfTheImage) {
  Identity builder;
  std::string token = make_token(server_, {"--image-group", "--account", builder.account,
                                           "--region", builder.region, "--image-id",
                                           "ami-0golden000000001"});
  std::string vol = new_volume_file();
  RunResult e = run({bin("keygate"), "enroll", vol, "--format", "--no-recovery", "--no-evidence",
                     "--server", server_.url(), "--ca", server_.ca(), "--enrollment-token-file",
                     token});
  ASSERT_EQ(e.exit_code, 0) << e.err;
  Identity launched;
  launched.image = "ami-0golden000000001";
  launched.instance = "i-0ddddddddddddddd1";
  Emulator emu = start_emulator(launched, dir_ + "/emu");
  EXPECT_EQ(unlock(vol, emu).exit_code, 0);
  Identity other_image = launched;
  other_image.image = "ami-0other0000000001";
  Emulator emu2 = start_emulator(other_image, dir_ + "/emu");
  EXPECT_EQ(unlock(vol, emu2).exit_code, kExitRefused);
}

// Revoking one instance of an image group's volume refuses that instance
// (exit 3, "revoked") and leaves the group's other instances unlocking it;
// on the audit trail; a volume bound to one instance is revoked whole
// instead, and a malformed instance id is refused.
TEST_F(KeygateTest, RevokingOneInstanceOfAnImageGroupLeavesItsOthersWorking) {
  Identity builder;
  std::string token = make_token(server_, {"--image-group", "--account", builder.account, "--region",
                                           builder.region, "--image-id", "ami-0golden000000002"});
  std::string vol = new_volume_file();
  RunResult e = run({bin("keygate"), "enroll", vol, "--format", "--no-recovery", "--no-evidence", "--server",
                     server_.url(), "--ca", server_.ca(), "--enrollment-token-file", token});
  ASSERT_EQ(e.exit_code, 0) << e.err;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(e.out, m, std::regex("enrolled as volume ([0-9a-f-]+)"))) << e.out;
  const std::string id = m[1].str();
  Identity one;
  one.image = "ami-0golden000000002";
  one.instance = "i-0eeeeeeeeeeeeeee1";
  Identity two = one;
  two.instance = "i-0eeeeeeeeeeeeeee2";
  Emulator emu_one = start_emulator(one, dir_ + "/emu");
  Emulator emu_two = start_emulator(two, dir_ + "/emu");
  ASSERT_EQ(unlock(vol, emu_one).exit_code, 0);
  ASSERT_EQ(unlock(vol, emu_two).exit_code, 0);

  auto revoke = [&](const std::string& volume, const std::string& instance) {
    return run({bin("keygate-server"), "volumes", "revoke", volume, "--instance", instance, "--state-dir",
                server_.state});
  };
  RunResult r = revoke(id, one.instance);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, "instance " + one.instance + " revoked")) << r.out;
  RunResult refused = unlock(vol, emu_one);
  EXPECT_EQ(refused.exit_code, kExitRefused) << refused.err;
  EXPECT_TRUE(contains(refused.err, "revoked")) << refused.err;
  EXPECT_EQ(unlock(vol, emu_two).exit_code, 0);
  RunResult again = revoke(id, one.instance);
  EXPECT_EQ(again.exit_code, 0) << again.err;
  EXPECT_TRUE(contains(again.out, "already revoked")) << again.out;
  RunResult list = run({bin("keygate-server"), "volumes", "list", "--state-dir", server_.state});
  EXPECT_TRUE(contains(list.out, "active")) << list.out;  // the volume itself stays active
  RunResult audit = run({bin("keygate-server"), "audit", "--state-dir", server_.state});
  EXPECT_TRUE(contains(audit.out, "revoke.instance ok volume=" + id + " peer=local instance " + one.instance))
      << audit.out;
  EXPECT_TRUE(contains(audit.out, "unlock refused volume=" + id)) << audit.out;
  EXPECT_TRUE(contains(audit.out, "instance revoked from the image group (aws instance_id=" + one.instance))
      << audit.out;
  EXPECT_EQ(run({bin("keygate-server"), "audit", "verify", "--state-dir", server_.state}).exit_code, 0);

  auto [single, single_id] = enrolled_volume();
  RunResult whole = revoke(single_id, Identity{}.instance);
  EXPECT_EQ(whole.exit_code, kExitUsage) << whole.err;
  EXPECT_TRUE(contains(whole.err, "belongs to one instance")) << whole.err;
  EXPECT_EQ(unlock(single, emulator_).exit_code, 0);
  RunResult bad = revoke(id, "i-1\x1b[2J");
  EXPECT_EQ(bad.exit_code, kExitUsage);
  EXPECT_TRUE(contains(bad.err, "\\x1b")) << bad.err;
  EXPECT_EQ(revoke("no-such-volume", "i-1").exit_code, 1);
}

// Rotation while the volume is being unlocked over and over: every unlock
// opens it, before, during and after each of three rotations (the old
// keyslot goes only once the new one is confirmed, and an unlock that read
// the header a moment before still opens it).
TEST_F(KeygateTest, RotationUnderConcurrentUnlocksNeverLeavesTheVolumeUnopenable) {
  // One instance unlocking back to back: its rate limit is off here.
  const std::string config = dir_ + "/" + unique("unlimited") + ".json";
  write_file(config, R"({"rate_limits": {"per_instance": {"per_second": 0, "burst": 1}}})");
  server_.process.stop();
  server_ = start_server("unlimited", {"--config", config});
  ASSERT_GT(server_.port, 0);
  auto [vol, id] = enrolled_volume();
  ASSERT_FALSE(id.empty());
  // A copy of the device (a snapshot) taken before the rotations.
  const std::string copy = dir_ + "/" + unique("snapshot") + ".img";
  ASSERT_EQ(run({"cp", "--sparse=always", vol, copy}).exit_code, 0);
  std::atomic<bool> stop{false};
  std::atomic<int> unlocks{0};
  std::mutex mu;
  std::vector<std::string> failures;
  std::vector<std::thread> unlockers;
  for (int t = 0; t < 2; ++t) {
    unlockers.emplace_back([&] {
      while (!stop) {
        RunResult r = unlock(vol, emulator_);
        ++unlocks;
        if (r.exit_code != 0) {
          std::lock_guard<std::mutex> lock(mu);
          failures.push_back(str_cat("exit ", r.exit_code, ": ", r.err));
        }
      }
    });
  }
  std::vector<std::string> volume_ids = {id};
  for (int i = 0; i < 3; ++i) {
    RunResult r = run({bin("keygate"), "rotate", vol, "--enrollment-token-file", make_token(server_),
                       "--metadata-url", emulator_.url(), "--timeout", "10"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::smatch m;
    if (std::regex_search(r.out, m, std::regex("rotated from volume ([0-9a-f-]+) to volume ([0-9a-f-]+)"))) {
      EXPECT_EQ(m[1].str(), volume_ids.back());
      volume_ids.push_back(m[2].str());
    }
  }
  stop = true;
  for (auto& t : unlockers) t.join();
  EXPECT_TRUE(failures.empty()) << failures.size() << " of " << unlocks.load() << " unlocks failed; first: "
                                << (failures.empty() ? "" : failures.front());
  EXPECT_GT(unlocks.load(), 6);
  ASSERT_EQ(volume_ids.size(), 4u);
  // The device now holds the last volume's keyslot and token only.
  RunResult status = run({bin("keygate"), "status", vol, "--json"});
  ASSERT_EQ(status.exit_code, 0) << status.err;
  EXPECT_TRUE(contains(status.out, volume_ids.back())) << status.out;
  for (size_t i = 0; i + 1 < volume_ids.size(); ++i) EXPECT_FALSE(contains(status.out, volume_ids[i])) << status.out;
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  // Each rotation retired the volume it replaced: the copy no longer opens.
  RunResult old_copy = unlock(copy, emulator_);
  EXPECT_EQ(old_copy.exit_code, kExitRefused) << old_copy.err;
  const std::string listed =
      run({bin("keygate-server"), "volumes", "list", "--state-dir", server_.state}).out;
  for (size_t i = 0; i + 1 < volume_ids.size(); ++i) {
    EXPECT_TRUE(std::regex_search(listed, std::regex(volume_ids[i] + " +revoked"))) << listed;
  }
}

// An image's root moves from the group's key to a key of its own: the group
// volume stays open for the image's other instances (their disks are copies
// of the same image), while the instance's own device opens with its own key.
TEST_F(KeygateTest, RotatingOffAnImageGroupsKeyLeavesTheGroupOpenForItsOthers) {
  Identity builder;
  std::string token =
      make_token(server_, {"--image-group", "--account", builder.account, "--region",
                           builder.region, "--image-id", builder.image});
  std::string vol = new_volume_file();
  RunResult e =
      run({bin("keygate"), "enroll", vol, "--format", "--no-recovery", "--no-evidence", "--server",
           server_.url(), "--ca", server_.ca(), "--enrollment-token-file", token});
  ASSERT_EQ(e.exit_code, 0) << e.err;
  const std::string other_disk = dir_ + "/" + unique("other-instance") + ".img";
  ASSERT_EQ(run({"cp", "--sparse=always", vol, other_disk}).exit_code, 0);
  RunResult r = run({bin("keygate"), "rotate", vol, "--enrollment-token-file", make_token(server_),
                     "--metadata-url", emulator_.url(), "--timeout", "10"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  Identity other = builder;
  other.instance = "i-0eeeeeeeeeeeeeee1";
  Emulator emu = start_emulator(other, dir_ + "/emu");
  RunResult theirs = unlock(other_disk, emu);
  EXPECT_EQ(theirs.exit_code, 0) << theirs.err;
}

TEST_F(KeygateTest, FormatRefusesDeviceWithFilesystemAndServerDownLeavesDeviceUntouched) {
  std::string vol = new_volume_file();
  ASSERT_EQ(run({"mke2fs", "-q", "-F", "-t", "ext4", vol}).exit_code, 0);
  std::string before = read_file(vol);
  RunResult r = enroll_format(vol, server_, make_token(server_), emulator_);
  EXPECT_EQ(r.exit_code, kExitVolume) << r.err;
  EXPECT_TRUE(contains(r.err, "not blank")) << r.err;
  EXPECT_EQ(read_file(vol), before);

  // Existing LUKS2 volume, server unreachable: no keyslot or token added.
  std::string luks = new_volume_file();
  std::string pass = dir_ + "/" + unique("pass");
  write_file(pass, "pw");
  ASSERT_EQ(run({"cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf",
                 "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", pass, luks})
                .exit_code,
            0);
  std::string header_before = read_file(luks).substr(0, 1 << 20);
  RunResult down = run({bin("keygate"), "enroll", luks, "--server", "https://127.0.0.1:1", "--ca",
                        server_.ca(), "--enrollment-token-file", make_token(server_),
                        "--metadata-url", emulator_.url(), "--passphrase-file", pass});
  EXPECT_EQ(down.exit_code, kExitUnreachable) << down.err;
  EXPECT_EQ(read_file(luks).substr(0, 1 << 20), header_before);
}

TEST_F(KeygateTest, EncryptInPlaceThenEnrollForImageBuilders) {
  // An ext4 image with data, encrypted in place and enrolled as an
  // image-group volume, the way an image builder would.
  std::string fsroot = dir_ + "/" + unique("fsroot");
  ASSERT_EQ(run({"mkdir", "-p", fsroot}).exit_code, 0);
  write_file(fsroot + "/data.txt", "plaintext that must not survive encryption");
  std::string image = dir_ + "/" + unique("image") + ".img";
  ASSERT_EQ(run({"truncate", "-s", "24M", image}).exit_code, 0);
  ASSERT_EQ(run({"mke2fs", "-q", "-F", "-t", "ext4", "-d", fsroot, image}).exit_code, 0);
  std::string recovery = dir_ + "/" + unique("recovery");
  write_file(recovery, "image recovery passphrase");
  Identity id;
  std::string token = make_token(server_, {"--image-group", "--account", id.account, "--region",
                                           id.region, "--image-id", id.image});
  std::vector<std::string> argv = {bin("keygate"), "encrypt", image, "--recovery-passphrase-file",
                                   recovery, "--no-evidence", "--server", server_.url(), "--ca",
                                   server_.ca(), "--enrollment-token-file", token};
  RunResult r = run(argv);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "100%")) << r.err;  // progress is shown
  EXPECT_FALSE(contains(read_file(image), "plaintext that must not survive")) << "plaintext left";
  EXPECT_EQ(unlock(image, emulator_).exit_code, 0);
  RunResult rec = run({"cryptsetup", "open", "--test-passphrase", "--key-file", recovery, image});
  EXPECT_EQ(rec.exit_code, 0) << rec.err;
  // The recovery keyslot's cost is bounded so small instances can open it.
  RunResult dump = run({"cryptsetup", "luksDump", image});
  EXPECT_TRUE(contains(dump.out, "argon2id")) << dump.out;
  EXPECT_TRUE(contains(dump.out, "Memory:     32768")) << dump.out;

  // Encrypting again is refused; a blank image is not "encrypted".
  RunResult again = run(argv);
  EXPECT_NE(again.exit_code, 0);
  EXPECT_TRUE(contains(again.err, "already")) << again.err;
  std::string blank = new_volume_file();
  argv[2] = blank;
  RunResult empty = run(argv);
  EXPECT_EQ(empty.exit_code, 2) << empty.err;
  EXPECT_TRUE(contains(empty.err, "no filesystem")) << empty.err;
}

TEST_F(KeygateTest, MetadataEmulatorSpeaksImdsV2) {
  httplib::Client cli("127.0.0.1", emulator_.port);
  // IMDSv2 only: no token, no answer.
  auto anon = cli.Get("/latest/dynamic/instance-identity/document");
  ASSERT_TRUE(anon);
  EXPECT_EQ(anon->status, 401);
  auto no_ttl = cli.Put("/latest/api/token", "", "text/plain");
  ASSERT_TRUE(no_ttl);
  EXPECT_EQ(no_ttl->status, 400);
  httplib::Headers fwd = {{"X-aws-ec2-metadata-token-ttl-seconds", "60"},
                          {"X-Forwarded-For", "10.0.0.1"}};
  auto forwarded = cli.Put("/latest/api/token", fwd, "", "text/plain");
  ASSERT_TRUE(forwarded);
  EXPECT_EQ(forwarded->status, 403);
  auto token = cli.Put("/latest/api/token", {{"X-aws-ec2-metadata-token-ttl-seconds", "60"}}, "",
                       "text/plain");
  ASSERT_TRUE(token);
  ASSERT_EQ(token->status, 200);
  auto doc = cli.Get("/latest/dynamic/instance-identity/document",
                     {{"X-aws-ec2-metadata-token", token->body}});
  ASSERT_TRUE(doc);
  EXPECT_EQ(doc->status, 200);
  EXPECT_EQ(doc->body.rfind("{\n  \"accountId\" : \"123456789012\",\n", 0), 0u) << doc->body;
  EXPECT_TRUE(contains(doc->body, "\"region\" : \"us-east-1\""));
  auto bad_token = cli.Get("/latest/meta-data/instance-id", {{"X-aws-ec2-metadata-token", "nope"}});
  ASSERT_TRUE(bad_token);
  EXPECT_EQ(bad_token->status, 401);
}

// A volume's description is text: refused by the unlocker before any
// keyslot is made and by the server on the wire when it is not, and a store
// written before that was checked still lists as valid UTF-8 JSON.
TEST_F(KeygateTest, DescriptionsAreTextAndTheVolumeListIsUtf8) {
  RunResult plain = enroll_format(new_volume_file(), server_, make_token(server_), emulator_);
  ASSERT_EQ(plain.exit_code, 0) << plain.err;  // the same command without one works
  for (const std::string& bad : std::vector<std::string>{"\x1b]0;owned\x07", "\xff\xfe", std::string(257, 'd')}) {
    std::string blank = new_volume_file();
    RunResult refused = run({bin("keygate"), "enroll", blank, "--format", "--no-recovery", "--server",
                             server_.url(), "--ca", server_.ca(), "--enrollment-token-file",
                             make_token(server_), "--metadata-url", emulator_.url(),
                             "--description", bad});
    EXPECT_EQ(refused.exit_code, 2) << refused.err;
    EXPECT_TRUE(contains(refused.err, "--description: ")) << refused.err;
    EXPECT_FALSE(unlocker::LuksDevice::open(blank).is_ok());
  }
  // Raw bytes on the wire: 400, nothing stored.
  const size_t before = run({bin("keygate-server"), "volumes", "list", "--json", "--state-dir",
                             server_.state}).out.size();
  auto res = api_client(server_)->Post(api::kEnrollRegisterPath, "{\"description\":\"\xff\xfe\"}",
                                       "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_TRUE(contains(res->body, "not UTF-8")) << res->body;
  RunResult same = run({bin("keygate-server"), "volumes", "list", "--json", "--state-dir", server_.state});
  EXPECT_EQ(same.out.size(), before);

  // A description an older server stored with raw bytes.
  server_.process.stop();
  {
    auto store = open_store_of(server_.state);
    ASSERT_NE(store, nullptr);
    server::VolumeRecord old;
    old.id = "old-volume-with-raw-bytes";
    old.state = server::VolumeState::kActive;
    old.policy_json = "{\"note\":\"\x1b[2J\"}";
    old.sealed_secret = Bytes(60, 1);
    old.description = "\xff\xfe\x1b[2J";
    ASSERT_TRUE(store->insert_volume(old).is_ok());
  }
  RunResult list = run({bin("keygate-server"), "volumes", "list", "--json", "--state-dir", server_.state});
  ASSERT_EQ(list.exit_code, 0) << list.err;
  EXPECT_TRUE(is_utf8(list.out)) << printable(list.out, 4096);
  Json::Value parsed;
  Json::CharReaderBuilder strict;
  Json::CharReaderBuilder::strictMode(&strict.settings_);
  std::istringstream in(list.out);
  std::string errors;
  ASSERT_TRUE(Json::parseFromStream(strict, in, &parsed, &errors)) << errors;
  bool found = false;
  for (const auto& v : parsed) {
    if (v["id"].asString() != std::string("old-volume-with-raw-bytes")) continue;
    found = true;
    EXPECT_EQ(v["description"].asString(), "\xef\xbf\xbd\xef\xbf\xbd\x1b[2J");
  }
  EXPECT_TRUE(found) << list.out;
  // The table view escapes what a terminal would act on.
  RunResult table = run({bin("keygate-server"), "volumes", "list", "--state-dir", server_.state});
  EXPECT_FALSE(contains(table.out, "\x1b")) << printable(table.out, 4096);
}

// A confirm the server carried out but whose answer was lost (a dropped
// path, a server killed after its commit) is asked again: the volume stays
// enrolled on both sides instead of the client rolling back what the
// server keeps active.
TEST_F(KeygateTest, ALostConfirmAnswerIsAskedAgainAndTheVolumeStaysEnrolled) {
  // Connection 1: challenge and register; 2: the confirm.
  FaultProxy proxy(server_.port, true, [](int n) {
    return n == 2 ? Fault{FaultKind::kLoseAnswer} : Fault{};
  });
  const std::string via = "https://127.0.0.1:" + std::to_string(proxy.port());
  std::string vol = new_volume_file();
  RunResult r = run({bin("keygate"), "enroll", vol, "--format", "--no-recovery", "--server", via,
                     "--ca", server_.ca(), "--enrollment-token-file", make_token(server_),
                     "--metadata-url", emulator_.url(), "--deadline", "20"});
  EXPECT_EQ(proxy.faults(), 1);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "confirm: ")) << r.err;
  EXPECT_TRUE(contains(r.err, "asking again in")) << r.err;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.err, m, std::regex("registered volume ([0-9a-f-]{36})"))) << r.err;
  const std::string id = m[1];
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);
  RunResult audit = run({bin("keygate-server"), "audit", "--state-dir", server_.state});
  size_t confirms = 0;
  for (size_t at = 0; (at = audit.out.find("enroll.confirm ok volume=" + id, at)) != std::string::npos; ++at) {
    ++confirms;
  }
  EXPECT_EQ(confirms, 2u) << audit.out;  // the lost one and the one asked again
}

// When no confirm answer arrives within the deadline the client rolls
// back, tells the server, and says what is left to an administrator.
TEST_F(KeygateTest, EveryConfirmAnswerLostRollsBackAndSaysWhatIsLeft) {
  FaultProxy proxy(server_.port, true, [](int n) {
    return n >= 2 ? Fault{FaultKind::kLoseAnswer} : Fault{};
  });
  const std::string via = "https://127.0.0.1:" + std::to_string(proxy.port());
  std::string vol = new_volume_file();
  RunResult r = run({bin("keygate"), "enroll", vol, "--format", "--no-recovery", "--server", via,
                     "--ca", server_.ca(), "--enrollment-token-file", make_token(server_),
                     "--metadata-url", emulator_.url(), "--deadline", "3", "--timeout", "2"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_GE(proxy.faults(), 3) << r.err;  // confirms, then the abandon
  EXPECT_TRUE(contains(r.err, "confirm not answered within 3 s")) << r.err;
  EXPECT_TRUE(contains(r.err, "rolled back")) << r.err;
  EXPECT_FALSE(unlocker::LuksDevice::open(vol).is_ok());
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.err, m, std::regex("registered volume ([0-9a-f-]{36})"))) << r.err;
  const std::string id = m[1];
  EXPECT_TRUE(contains(r.err, "revoke it (keygate-server volumes revoke " + id + ")")) << r.err;
  // The confirms did reach the server, so it refused to let the client
  // revoke an active volume, on the record.
  RunResult audit = run({bin("keygate-server"), "audit", "--state-dir", server_.state});
  EXPECT_TRUE(contains(audit.out, "enroll.abandon refused volume=" + id)) << audit.out;
  EXPECT_TRUE(contains(audit.out, "abandon refused: volume is active")) << audit.out;
}

// A volume registered and never confirmed (its client died between the
// two) does not stay pending for ever: a start, like a registration,
// revokes those past pending_ttl, each on the audit trail.
TEST_F(KeygateTest, AStartRevokesPendingVolumesPastTheirTime) {
  server_.process.stop();
  const int64_t now = static_cast<int64_t>(time(nullptr));
  {
    auto store = open_store_of(server_.state);
    ASSERT_NE(store, nullptr);
    for (auto [id, created] : {std::pair{"left-two-days-ago", now - 2 * 86400}, std::pair{"left-now", now}}) {
      server::VolumeRecord v;
      v.id = id;
      v.policy_json = "{}";
      v.sealed_secret = Bytes(60, 1);
      v.created_at = v.updated_at = created;
      ASSERT_TRUE(store->insert_volume(v).is_ok());
    }
  }
  Server again = start_server("pending-ttl", {}, server_.state);
  ASSERT_GT(again.port, 0) << read_file(again.process.log_path());
  again.process.stop();
  EXPECT_TRUE(contains(read_file(again.process.log_path()), "revoked 1 pending volume(s) never confirmed within 86400 s"))
      << read_file(again.process.log_path());
  RunResult audit = run({bin("keygate-server"), "audit", "--state-dir", server_.state});
  EXPECT_TRUE(contains(audit.out, "enroll.expire ok volume=left-two-days-ago")) << audit.out;
  EXPECT_FALSE(contains(audit.out, "volume=left-now")) << audit.out;
  RunResult list = run({bin("keygate-server"), "volumes", "list", "--state-dir", server_.state});
  EXPECT_TRUE(std::regex_search(list.out, std::regex("left-two-days-ago +revoked"))) << list.out;
  EXPECT_TRUE(std::regex_search(list.out, std::regex("left-now +pending"))) << list.out;
  // The setting is checked at start.
  const std::string config = dir_ + "/" + unique("ttl") + ".json";
  write_file(config, R"({"pending_ttl": "1 day"})");
  RunResult bad = run({bin("keygate-server"), "serve", "--config", config, "--state-dir", server_.state,
                       "--listen", "127.0.0.1:0"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_TRUE(contains(bad.err, "'pending_ttl' must be whole seconds")) << bad.err;
}

// On AWS the identity document is static and public copies of real ones
// exist: an attestation rule for AWS would admit whoever holds a copy, so
// the server refuses to start with one, and says why.
TEST_F(KeygateTest, AnAwsAttestationRuleIsRefusedAtStart) {
  const std::string config = dir_ + "/" + unique("attest") + ".json";
  write_file(config, R"({"enroll_by_attestation": [{"platform": "aws",
      "require": {"account_id": "123456789012", "region": "us-east-1"}}]})");
  RunResult aws = run({bin("keygate-server"), "serve", "--config", config, "--state-dir",
                       dir_ + "/" + unique("aws-rule-state"), "--listen", "127.0.0.1:0"});
  EXPECT_EQ(aws.exit_code, 2);
  EXPECT_TRUE(contains(aws.err, "enroll_by_attestation[0]: 'aws' cannot enroll by attestation")) << aws.err;
  EXPECT_TRUE(contains(aws.err, "enroll aws instances with a token")) << aws.err;
  // A rule that binds no account is refused at start-up.
  const std::string loose = dir_ + "/" + unique("loose") + ".json";
  write_file(loose, R"({"enroll_by_attestation": [{"platform": "gcp", "require": {"zone": "us-central1-a"}}]})");
  RunResult bad = run({bin("keygate-server"), "serve", "--config", loose, "--state-dir",
                       dir_ + "/" + unique("loose-state"), "--listen", "127.0.0.1:0"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_TRUE(contains(bad.err, "must require 'project_id'")) << bad.err;
  // Without a token an AWS instance is not admitted, and the device stays blank.
  std::string blank = new_volume_file();
  RunResult refused = run({bin("keygate"), "enroll", blank, "--format", "--no-recovery", "--server",
                           server_.url(), "--ca", server_.ca(), "--metadata-url", emulator_.url()});
  EXPECT_EQ(refused.exit_code, kExitRefused) << refused.err;
  EXPECT_TRUE(contains(refused.err, "enrollment_token_invalid")) << refused.err;
  EXPECT_FALSE(unlocker::LuksDevice::open(blank).is_ok());
  // No token and no evidence is a usage error.
  RunResult usage = run({bin("keygate"), "enroll", new_volume_file(), "--format", "--no-recovery",
                         "--no-evidence", "--server", server_.url(), "--ca", server_.ca()});
  EXPECT_EQ(usage.exit_code, 2) << usage.err;
}


}  // namespace
}  // namespace keygate::testing
