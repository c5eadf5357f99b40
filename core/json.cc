#include "core/json.h"

#include "core/encoding.h"

#include <json/reader.h>

#include <cmath>
#include <cstdio>
#include <exception>
#include <memory>
#include <string>

namespace keygate {

Result<Json::Value> parse_json_object(std::string_view text, size_t max_bytes) {
  if (text.size() > max_bytes) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("JSON document larger than ", max_bytes, " bytes"));
  }
  if (!is_utf8(text)) {
    return Status::error(ErrorKind::kInvalidArgument, "malformed JSON: not UTF-8");
  }
  Json::Value root;
  std::string errors;
  if (!parse_json_strict(text, &root, &errors)) {
    // jsoncpp errors can be long and quote input: keep the first line only.
    auto nl = errors.find('\n');
    std::string first = errors.substr(0, nl == std::string::npos ? 120 : std::min<size_t>(nl, 120));
    return Status::error(ErrorKind::kInvalidArgument, str_cat("malformed JSON: ", first));
  }
  if (!root.isObject()) {
    return Status::error(ErrorKind::kInvalidArgument, "JSON document is not an object");
  }
  return root;
}

bool parse_json_strict(std::string_view text, Json::Value* root, std::string* errors) {
  // One strict reader per thread, made once: building it (its settings are a
  // Json::Value of a dozen members) cost more than parsing a small request.
  // Each parse starts from a clean state; a reader that threw is dropped.
  thread_local std::unique_ptr<Json::CharReader> reader;
  try {
    if (!reader) {
      Json::CharReaderBuilder builder;
      Json::CharReaderBuilder::strictMode(&builder.settings_);
      builder.settings_["stackLimit"] = 32;
      builder.settings_["rejectDupKeys"] = true;
      builder.settings_["failIfExtra"] = true;
      reader.reset(builder.newCharReader());
    }
    return reader->parse(text.data(), text.data() + text.size(), root, errors);
  } catch (const std::exception& e) {
    reader.reset();
    *errors = e.what();
    return false;
  }
}

namespace {

// JSON text of a Json::Value, byte for byte as jsoncpp's StreamWriterBuilder
// writes it with emitUTF8 and the given indentation ("" compact, "  "
// pretty), without its iostreams (the static keygate carries none; the unit
// test compares the two on many documents). Object members in jsoncpp's
// order, strings with ", \ and control characters escaped and every other
// byte as it is, doubles with 17 significant digits.
class JsonWriter {
 public:
  explicit JsonWriter(std::string indentation)
      : unit_(std::move(indentation)), colon_(unit_.empty() ? ":" : " : ") {}

  std::string write(const Json::Value& root) {
    indented_ = true;
    write_value(root);
    return std::move(out_);
  }

 private:
  void newline_and_indent() {
    if (!unit_.empty()) {
      out_ += '\n';
      out_ += indent_;
    }
  }
  void with_indent(std::string_view text) {
    if (!indented_) newline_and_indent();
    out_ += text;
    indented_ = false;
  }
  // An array or object: "[]" or "{}" when empty (false: nothing to write
  // inside), else its opening bracket and one more level of indentation.
  bool open(const Json::Value& v, std::string_view empty) {
    if (v.empty()) {
      out_ += empty;
      return false;
    }
    with_indent(empty.substr(0, 1));
    indent_ += unit_;
    return true;
  }
  void close(std::string_view bracket) {
    indent_.resize(indent_.size() - unit_.size());
    with_indent(bracket);
  }
  void quoted(const char* begin, const char* end) {
    // JSON text is UTF-8 (RFC 8259): bytes that are not become U+FFFD.
    const std::string_view text(begin, static_cast<size_t>(end - begin));
    if (!is_utf8(text)) {
      const std::string valid = to_utf8_lossy(text);
      quoted(valid.data(), valid.data() + valid.size());
      return;
    }
    static constexpr char kHex[] = "0123456789abcdef";
    out_ += '"';
    for (const char* c = begin; c != end; ++c) {
      auto byte = static_cast<unsigned char>(*c);
      switch (byte) {
        case '"': out_ += "\\\""; break;
        case '\\': out_ += "\\\\"; break;
        case '\b': out_ += "\\b"; break;
        case '\f': out_ += "\\f"; break;
        case '\n': out_ += "\\n"; break;
        case '\r': out_ += "\\r"; break;
        case '\t': out_ += "\\t"; break;
        default:
          if (byte < 0x20) {
            out_ += "\\u00";
            out_ += kHex[byte >> 4];
            out_ += kHex[byte & 0xf];
          } else {
            out_ += static_cast<char>(byte);
          }
      }
    }
    out_ += '"';
  }
  void real(double v) {
    if (!std::isfinite(v)) {
      out_ += std::isnan(v) ? "null" : v < 0 ? "-1e+9999" : "1e+9999";
      return;
    }
    char buf[40];
    int n = snprintf(buf, sizeof(buf), "%.17g", v);
    std::string text(buf, static_cast<size_t>(n > 0 ? n : 0));
    for (char& c : text) {
      if (c == ',') c = '.';  // a locale's decimal comma
    }
    if (text.find('.') == std::string::npos && text.find('e') == std::string::npos) text += ".0";
    out_ += text;
  }
  void write_value(const Json::Value& v) {
    switch (v.type()) {
      case Json::nullValue: out_ += "null"; break;
      case Json::intValue: out_ += std::to_string(v.asLargestInt()); break;
      case Json::uintValue: out_ += std::to_string(v.asLargestUInt()); break;
      case Json::realValue: real(v.asDouble()); break;
      case Json::booleanValue: out_ += v.asBool() ? "true" : "false"; break;
      case Json::stringValue: {
        const char* begin = nullptr;
        const char* end = nullptr;
        if (v.getString(&begin, &end)) quoted(begin, end);
        break;
      }
      case Json::arrayValue: {
        if (!open(v, "[]")) break;
        for (Json::ArrayIndex i = 0; i < v.size(); ++i) {
          if (i > 0) out_ += ',';
          if (!indented_) newline_and_indent();
          indented_ = true;
          write_value(v[i]);
          indented_ = false;
        }
        close("]");
        break;
      }
      case Json::objectValue: {
        if (!open(v, "{}")) break;
        bool first = true;
        for (auto it = v.begin(); it != v.end(); ++it) {
          if (!first) out_ += ',';
          first = false;
          indented_ = false;
          std::string name = it.name();
          newline_and_indent();
          quoted(name.data(), name.data() + name.size());
          out_ += colon_;
          write_value(*it);
        }
        close("}");
        break;
      }
    }
  }

  const std::string unit_;
  const std::string colon_;
  std::string indent_;
  std::string out_;
  bool indented_ = false;
};

}  // namespace

std::string to_json(const Json::Value& value) { return JsonWriter("").write(value); }

std::string to_pretty_json(const Json::Value& value) { return JsonWriter("  ").write(value); }

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
  // The document is UTF-8, but a \u escape of a lone surrogate is not.
  if (!is_utf8(s)) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("field '", key, "' is not UTF-8"));
  }
  return s;
}

Result<std::string> json_optional_text(const Json::Value& obj, const char* key, size_t max_len) {
  auto s = json_optional_string(obj, key, max_len);
  if (s.is_ok() && !is_display_text(s.value())) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("field '", key, "' holds a control character"));
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
