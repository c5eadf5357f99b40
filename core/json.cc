#include "core/json.h"

#include <json/reader.h>
#include <json/writer.h>

#include <exception>
#include <memory>
#include <sstream>

namespace keygate {

Result<Json::Value> parse_json_object(std::string_view text, size_t max_bytes) {
  if (text.size() > max_bytes) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("JSON document larger than ", max_bytes, " bytes"));
  }
  try {
    Json::CharReaderBuilder builder;
    Json::CharReaderBuilder::strictMode(&builder.settings_);
    builder.settings_["stackLimit"] = 32;
    builder.settings_["rejectDupKeys"] = true;
    builder.settings_["failIfExtra"] = true;
    std::unique_ptr<Json::CharReader> reader(builder.newCharReader());
    Json::Value root;
    std::string errors;
    if (!reader->parse(text.data(), text.data() + text.size(), &root, &errors)) {
      // jsoncpp errors can be long and quote input: keep the first line only.
      auto nl = errors.find('\n');
      std::string first = errors.substr(0, nl == std::string::npos ? 120 : std::min<size_t>(nl, 120));
      return Status::error(ErrorKind::kInvalidArgument, str_cat("malformed JSON: ", first));
    }
    if (!root.isObject()) {
      return Status::error(ErrorKind::kInvalidArgument, "JSON document is not an object");
    }
    return root;
  } catch (const std::exception& e) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("malformed JSON: ", e.what()));
  }
}

std::string to_json(const Json::Value& value) {
  try {
    Json::StreamWriterBuilder builder;
    builder["indentation"] = "";
    builder["emitUTF8"] = true;
    return Json::writeString(builder, value);
  } catch (const std::exception&) {
    return "null";
  }
}

std::string to_pretty_json(const Json::Value& value) {
  try {
    Json::StreamWriterBuilder builder;
    builder["indentation"] = "  ";
    builder["emitUTF8"] = true;
    return Json::writeString(builder, value);
  } catch (const std::exception&) {
    return "null";
  }
}

Result<std::string> json_string(const Json::Value& obj, const char* key, size_t max_len) {
  if (!obj.isObject() || !obj.isMember(key)) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("missing field '", key, "'"));
  }
  const Json::Value& v = obj[key];
  if (!v.isString()) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("field '", key, "' is not a string"));
  }
  std::string s = v.asString();
  if (s.size() > max_len) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("field '", key, "' longer than ", max_len, " bytes"));
  }
  return s;
}

Result<std::string> json_optional_string(const Json::Value& obj, const char* key, size_t max_len,
                                         std::string fallback) {
  if (!obj.isObject() || !obj.isMember(key) || obj[key].isNull()) return fallback;
  return json_string(obj, key, max_len);
}

Result<int64_t> json_int(const Json::Value& obj, const char* key, int64_t min, int64_t max) {
  if (!obj.isObject() || !obj.isMember(key)) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("missing field '", key, "'"));
  }
  const Json::Value& v = obj[key];
  if (!v.isInt64()) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("field '", key, "' is not an integer"));
  }
  int64_t n = v.asInt64();
  if (n < min || n > max) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("field '", key, "' out of range [", min, ", ", max, "]"));
  }
  return n;
}

Result<Json::Value> json_object(const Json::Value& obj, const char* key, bool required) {
  if (!obj.isObject() || !obj.isMember(key) || obj[key].isNull()) {
    if (required) {
      return Status::error(ErrorKind::kInvalidArgument, str_cat("missing field '", key, "'"));
    }
    return Json::Value(Json::nullValue);
  }
  if (!obj[key].isObject()) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("field '", key, "' is not an object"));
  }
  return obj[key];
}

}  // namespace keygate
