// A small command-line parser: "--name value", "--name=value", boolean
// "--name", repeated options, and positional arguments. Unknown options are
// an error, so a typo never silently changes behaviour.
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

#include "core/status.h"

namespace keygate {

class Args {
 public:
  // `with_value`: options that take a value; `flags`: options that do not.
  static Result<Args> parse(const std::vector<std::string>& argv,
                            const std::set<std::string>& with_value,
                            const std::set<std::string>& flags);

  bool has(const std::string& name) const { return values_.count(name) > 0; }
  // The last value given for `name`, or `fallback`.
  std::string get(const std::string& name, const std::string& fallback = "") const;
  std::vector<std::string> get_all(const std::string& name) const;
  Result<long> get_int(const std::string& name, long fallback, long min, long max) const;
  const std::vector<std::string>& positional() const { return positional_; }

  // Every option given, by name.
  std::vector<std::string> names() const;

 private:
  std::map<std::string, std::vector<std::string>> values_;
  std::vector<std::string> positional_;
};

}  // namespace keygate
