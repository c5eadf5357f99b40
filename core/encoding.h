// Base64 (standard and URL-safe) and hex. Decoders are strict: they refuse
// characters outside the alphabet, bad padding and non-canonical trailing
// bits, so two different strings never decode to the same bytes.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace keygate {

using Bytes = std::vector<uint8_t>;

std::string base64_encode(const uint8_t* data, size_t size);
inline std::string base64_encode(const Bytes& b) { return base64_encode(b.data(), b.size()); }
inline std::string base64_encode(std::string_view s) {
  return base64_encode(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

// Standard alphabet with padding. With `skip_whitespace`, ASCII whitespace
// (line breaks in PEM-like bodies) is ignored.
Result<Bytes> base64_decode(std::string_view text, bool skip_whitespace = false);

// URL-safe alphabet without padding (JWT, RFC 7515).
std::string base64url_encode(const uint8_t* data, size_t size);
Result<Bytes> base64url_decode(std::string_view text);

std::string hex_encode(const uint8_t* data, size_t size);
inline std::string hex_encode(const Bytes& b) { return hex_encode(b.data(), b.size()); }
Result<Bytes> hex_decode(std::string_view text);

inline std::string_view as_string_view(const Bytes& b) {
  return std::string_view(reinterpret_cast<const char*>(b.data()), b.size());
}
inline Bytes to_bytes(std::string_view s) { return Bytes(s.begin(), s.end()); }

// `text` made safe for a log line or a terminal: printable ASCII kept, every
// other byte (control characters, escapes, non-ASCII) written as \xNN, and
// cut to `max_len` input bytes with "..." after.
std::string printable(std::string_view text, size_t max_len);

// Whether `text` is well-formed UTF-8 (RFC 3629: shortest forms only, no
// surrogates, nothing above U+10FFFF).
bool is_utf8(std::string_view text);

// `text` with every byte that is not part of a well-formed UTF-8 sequence
// replaced by U+FFFD, so that what is written as JSON or shown is UTF-8.
std::string to_utf8_lossy(std::string_view text);

// Whether `text` is UTF-8 with no control character (C0, DEL, C1): text a
// person wrote for a person to read, such as a volume's description.
bool is_display_text(std::string_view text);

}  // namespace keygate
