#include "tests/keygate_fixture.h"

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

}  // namespace keygate::testing
