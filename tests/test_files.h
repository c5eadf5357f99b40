// Fixture access for the unit tests.
#pragma once

#include <fstream>
#include <iterator>
#include <string>

namespace keygate::test_files {

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

inline const std::string kRealFixtures = std::string(KEYGATE_FIXTURES) + "/real/";

}  // namespace keygate::test_files
