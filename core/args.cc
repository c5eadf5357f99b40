#include "core/args.h"

#include <cerrno>
#include <cstdlib>

namespace keygate {

Result<Args> Args::parse(const std::vector<std::string>& argv,
                         const std::set<std::string>& with_value,
                         const std::set<std::string>& flags) {
  Args a;
  bool only_positional = false;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& arg = argv[i];
    if (only_positional || arg.size() < 3 || arg.compare(0, 2, "--") != 0) {
      if (arg == "--") {
        only_positional = true;
        continue;
      }
      a.positional_.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2);
    std::string value;
    bool inline_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      inline_value = true;
    }
    if (flags.count(name)) {
      if (inline_value) {
        return Status::error(ErrorKind::kInvalidArgument, str_cat("--", name, " takes no value"));
      }
      a.values_[name].push_back("1");
    } else if (with_value.count(name)) {
      if (!inline_value) {
        if (i + 1 >= argv.size()) {
          return Status::error(ErrorKind::kInvalidArgument, str_cat("--", name, " needs a value"));
        }
        value = argv[++i];
      }
      a.values_[name].push_back(value);
    } else {
      return Status::error(ErrorKind::kInvalidArgument, str_cat("unknown option --", name));
    }
  }
  return a;
}

std::string Args::get(const std::string& name, const std::string& fallback) const {
  auto it = values_.find(name);
  return it == values_.end() || it->second.empty() ? fallback : it->second.back();
}

std::vector<std::string> Args::get_all(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

Result<long> Args::get_int(const std::string& name, long fallback, long min, long max) const {
  if (!has(name)) return fallback;
  std::string text = get(name);
  errno = 0;
  char* end = nullptr;
  long v = strtol(text.c_str(), &end, 10);
  if (errno != 0 || end == text.c_str() || *end != '\0' || v < min || v > max) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("--", name, " must be an integer in [", min, ", ", max, "]"));
  }
  return v;
}

std::vector<std::string> Args::names() const {
  std::vector<std::string> out;
  for (const auto& [name, values] : values_) out.push_back(name);
  return out;
}

}  // namespace keygate
