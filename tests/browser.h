// Headless Chromium (Debian's chromium) driven over the DevTools protocol,
// for the console test: a real browser that holds a person's client
// certificate in its own NSS database and sends it when the server asks
// (the profile's auto-select setting for the server's origin, as an
// enterprise policy would set it), trusts the server's CA only through that
// database, and runs the page as any browser would, with its CSP enforced.
//
// The protocol runs over a pipe (--remote-debugging-pipe): no port is
// opened. Every wait has a deadline; the browser is killed with its folder's
// test.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include <json/value.h>

namespace keygate::testing {

class Browser {
 public:
  struct Person {
    std::string cert_file, key_file;  // PEM, as `admin bootstrap` and `cert issue` write them
  };
  // A browser in `dir` (made) trusting `server_ca_file` for `origin`
  // ("https://127.0.0.1:PORT") and holding `person`'s certificate; null and
  // *error on failure.
  static std::unique_ptr<Browser> start(const std::string& dir, const std::string& server_ca_file,
                                        const std::string& origin, const Person& person, std::string* error);
  ~Browser();

  // Loads `url` in the page and waits up to `timeout_ms` for `ready` (a JS
  // expression) to be true. False on timeout.
  bool open(const std::string& url, const std::string& ready, int timeout_ms = 20000);
  // The value of a JS expression (promises awaited); null on an exception,
  // with its text in *error if given.
  Json::Value eval(const std::string& expression, std::string* error = nullptr);
  // Waits up to `timeout_ms` for a JS expression to be true.
  bool wait_for(const std::string& expression, int timeout_ms = 20000);
  // A real mouse click at the centre of the first element `selector`
  // matches; false if there is none (or it has no size).
  bool click(const std::string& selector);
  // Types `text` into the focused element, as a keyboard would.
  void type(const std::string& text);
  // The page as a PNG file.
  bool screenshot(const std::string& path);
  // Content-Security-Policy violations the page reported, each
  // "directive blocked-uri".
  std::vector<std::string> csp_violations();

 private:
  Browser() = default;
  // A protocol command (on the page's session unless `browser_level`);
  // its result, or null (and the error in last_error_) after 20 s.
  Json::Value send(const std::string& method, Json::Value params, bool browser_level = false);
  bool read_message(Json::Value* out, int timeout_ms);

  pid_t pid_ = -1;
  int to_browser_ = -1, from_browser_ = -1;
  std::string buffered_;
  int next_id_ = 1;
  std::string session_;
  std::string last_error_;
};

}  // namespace keygate::testing
