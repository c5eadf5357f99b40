// JSON on jsoncpp, wrapped so no exception escapes. Parsing is strict (no
// comments, no trailing garbage, duplicate keys refused), depth-bounded and
// size-bounded. Field getters return a Status naming the missing/bad field.
#pragma once

#include <json/value.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "core/status.h"

namespace keygate {

constexpr size_t kDefaultJsonMaxBytes = 64 * 1024;

// Parses `text` as a JSON document that must be an object.
Result<Json::Value> parse_json_object(std::string_view text,
                                      size_t max_bytes = kDefaultJsonMaxBytes);

// The strict parse under parse_json_object, of any JSON value: false with
// jsoncpp's own error text ("* Line L, Column C\n  message") on failure.
// Each value keeps its place in `text` (Json::Value::getOffsetStart). The
// caller checks size and UTF-8.
bool parse_json_strict(std::string_view text, Json::Value* root, std::string* errors);

// Compact serialisation (no whitespace, keys in sorted order).
std::string to_json(const Json::Value& value);
// Indented serialisation for people.
std::string to_pretty_json(const Json::Value& value);

// A string member of at most `max_len` bytes; missing, wrong type or too long
// fails with kInvalidArgument naming `key`.
Result<std::string> json_string(const Json::Value& obj, const char* key, size_t max_len);
// Like json_string, but a missing or null member yields `fallback`.
Result<std::string> json_optional_string(const Json::Value& obj, const char* key, size_t max_len,
                                         std::string fallback = "");
// Like json_optional_string (empty if missing), for text a person reads:
// refused if it holds a control character (C0, DEL, C1).
Result<std::string> json_optional_text(const Json::Value& obj, const char* key, size_t max_len);
// An integer member within [min, max].
Result<int64_t> json_int(const Json::Value& obj, const char* key, int64_t min, int64_t max);
// An object member (may be absent when `required` is false: yields null).
Result<Json::Value> json_object(const Json::Value& obj, const char* key, bool required);

}  // namespace keygate
