#include "tests/keygate_fixture.h"

#include <sys/stat.h>

#include <cerrno>

#include "tests/pg_cluster.h"

namespace keygate::testing {

std::string KeygateTest::dir_;
std::string KeygateTest::suite_setup_error_;

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

#ifndef KEYGATE_PLUGIN_HOST_ENV
#define KEYGATE_PLUGIN_HOST_ENV ""
#endif

RunResult cryptsetup_with_plugin(const std::string& args, const std::string& plugin_env) {
  const std::string env = std::string(KEYGATE_PLUGIN_HOST_ENV) + " " + plugin_env;
  const std::string plugins = std::string(KEYGATE_BIN_DIR) + "/../lib/cryptsetup";
  const std::string target = KEYGATE_TOKEN_PLUGIN_DIR;
  return run({"unshare", "-m", "sh", "-c",
              "mkdir -p '" + target + "' && mount --bind '" + plugins + "' '" + target + "' && " +
                  env + " cryptsetup " + args});
}

bool KeygateTest::on_postgres() {
  const char* store = getenv("KEYGATE_TEST_STORE");
  return store != nullptr && std::string(store) == "postgresql";
}

std::string KeygateTest::conninfo_of(const std::string& state) {
  std::string c = read_file(state + "/store.conf");
  while (!c.empty() && c.back() == '\n') c.pop_back();
  return c;
}

std::unique_ptr<server::Store> KeygateTest::open_store_of(const std::string& state) {
  auto s = on_postgres() ? server::open_postgres_store(conninfo_of(state))
                         : server::open_sqlite_store(state + "/keygate.db");
  EXPECT_TRUE(s.is_ok()) << s.status().message();
  return s.is_ok() ? std::move(s).value() : nullptr;
}

std::string KeygateTest::store_sql(const std::string& state, const std::string& sql) {
  return PgCluster::exec(conninfo_of(state), sql);
}

void KeygateTest::use_test_store(const std::string& state) {
  if (!on_postgres()) return;
  const std::string conf = state + "/store.conf";
  if (access(conf.c_str(), F_OK) == 0) return;  // a restart: the same database
  PgCluster& pg = PgCluster::shared();
  ASSERT_EQ(pg.error(), "");
  const std::string conninfo = pg.create_database();
  ASSERT_NE(conninfo, "");
  ASSERT_TRUE(mkdir(state.c_str(), 0700) == 0 || errno == EEXIST) << state;
  write_file(conf, conninfo + "\n");
}

}  // namespace keygate::testing
