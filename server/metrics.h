// Prometheus metrics (issue: the operators' view): counters, gauges and
// histograms with labels, rendered in the Prometheus text exposition format
// (version 0.0.4). Thread-safe; label values are escaped as the format
// requires (backslash, double quote, newline), so whatever a client sent
// cannot break a line of the output.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace keygate::server {

class Metrics {
 public:
  using Labels = std::vector<std::pair<std::string, std::string>>;

  // Declares a family once (its name, help and kind); later calls with the
  // same name return the same family. Names must match [a-zA-Z_:][a-zA-Z0-9_:]*.
  void counter_add(const std::string& name, const std::string& help, const Labels& labels,
                   double by = 1);
  void gauge_set(const std::string& name, const std::string& help, const Labels& labels,
                 double value);
  // `bounds`: the buckets' upper bounds, ascending (+Inf is added).
  void observe(const std::string& name, const std::string& help, const std::vector<double>& bounds,
               const Labels& labels, double value);

  // Every family, sorted by name, each series sorted by its labels.
  std::string render() const;

 private:
  enum class Kind { kCounter, kGauge, kHistogram };
  struct Series {
    double value = 0;               // counter, gauge
    std::vector<uint64_t> buckets;  // histogram: cumulative counts per bound, +Inf last
    double sum = 0;
    uint64_t count = 0;
  };
  struct Family {
    Kind kind;
    std::string help;
    std::vector<double> bounds;
    std::map<std::string, Series> series;  // by rendered label set
  };
  Family& family(const std::string& name, const std::string& help, Kind kind,
                 const std::vector<double>& bounds);

  mutable std::mutex mu_;
  std::map<std::string, Family> families_;
};

// A label value as the text format writes it: \ " and newline escaped.
std::string escape_label_value(const std::string& value);

}  // namespace keygate::server
