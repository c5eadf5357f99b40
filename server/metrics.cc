#include "server/metrics.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace keygate::server {
namespace {

std::string number(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  // The shortest text that reads back as the same double.
  char text[64];
  for (int digits = 15; digits <= 17; ++digits) {
    std::snprintf(text, sizeof(text), "%.*g", digits, v);
    if (std::strtod(text, nullptr) == v) break;
  }
  return text;
}

std::string label_set(const Metrics::Labels& labels) {
  std::string out;
  for (const auto& [k, v] : labels) {
    out += (out.empty() ? "" : ",") + k + "=\"" + escape_label_value(v) + "\"";
  }
  return out;
}

std::string with_braces(const std::string& set) { return set.empty() ? "" : "{" + set + "}"; }

}  // namespace

std::string escape_label_value(const std::string& value) {
  std::string out;
  for (char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

Metrics::Family& Metrics::family(const std::string& name, const std::string& help, Kind kind,
                                 const std::vector<double>& bounds) {
  auto it = families_.find(name);
  if (it == families_.end()) it = families_.emplace(name, Family{kind, help, bounds, {}}).first;
  return it->second;
}

void Metrics::counter_add(const std::string& name, const std::string& help, const Labels& labels,
                          double by) {
  std::lock_guard<std::mutex> lock(mu_);
  family(name, help, Kind::kCounter, {}).series[label_set(labels)].value += by;
}

void Metrics::gauge_set(const std::string& name, const std::string& help, const Labels& labels,
                        double value) {
  std::lock_guard<std::mutex> lock(mu_);
  family(name, help, Kind::kGauge, {}).series[label_set(labels)].value = value;
}

void Metrics::observe(const std::string& name, const std::string& help,
                      const std::vector<double>& bounds, const Labels& labels, double value) {
  std::lock_guard<std::mutex> lock(mu_);
  Family& f = family(name, help, Kind::kHistogram, bounds);
  Series& s = f.series[label_set(labels)];
  if (s.buckets.empty()) s.buckets.assign(f.bounds.size() + 1, 0);
  for (size_t i = 0; i < f.bounds.size(); ++i) {
    if (value <= f.bounds[i]) ++s.buckets[i];
  }
  ++s.buckets.back();
  s.sum += value;
  ++s.count;
}

std::string Metrics::render() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  for (const auto& [name, f] : families_) {
    const char* kind = f.kind == Kind::kCounter ? "counter"
                       : f.kind == Kind::kGauge ? "gauge"
                                                : "histogram";
    out += "# HELP " + name + " " + f.help + "\n# TYPE " + name + " " + kind + "\n";
    for (const auto& [labels, s] : f.series) {
      if (f.kind != Kind::kHistogram) {
        out += name + with_braces(labels) + " " + number(s.value) + "\n";
        continue;
      }
      for (size_t i = 0; i < s.buckets.size(); ++i) {
        const std::string le = i < f.bounds.size() ? number(f.bounds[i]) : "+Inf";
        std::string set = labels;
        set += (set.empty() ? "" : ",") + std::string("le=\"") + le + "\"";
        out += name + "_bucket{" + set + "} " + std::to_string(s.buckets[i]) + "\n";
      }
      out += name + "_sum" + with_braces(labels) + " " + number(s.sum) + "\n";
      out += name + "_count" + with_braces(labels) + " " + std::to_string(s.count) + "\n";
    }
  }
  return out;
}

}  // namespace keygate::server
