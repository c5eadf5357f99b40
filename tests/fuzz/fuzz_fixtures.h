// What the fuzz targets load once: the real fixtures (tests/fixtures/real).
#pragma once

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

#include "core/encoding.h"

namespace keygate::fuzz {

inline std::string fixture(const std::string& name) {
  std::ifstream in(std::string(KEYGATE_FIXTURES) + "/" + name, std::ios::binary);
  if (!in) abort();  // a target without its fixtures would fuzz nothing
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

inline std::string trimmed(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
  return s;
}

// The fuzzer's bytes as text, and as the bytes after a one-byte selector.
inline std::string_view text_of(const uint8_t* data, size_t size) {
  return std::string_view(reinterpret_cast<const char*>(data), size);
}

}  // namespace keygate::fuzz
