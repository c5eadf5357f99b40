#include "tests/browser.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "core/encoding.h"
#include "core/json.h"
#include "tests/harness.h"

namespace keygate::testing {
namespace {

constexpr size_t kMaxMessage = 64 << 20;  // a screenshot's base64

// Records the page's CSP violations; added by the protocol (which the
// page's CSP does not govern) before any script of the page runs.
constexpr char kCspRecorder[] = R"(
window.__csp = [];
document.addEventListener('securitypolicyviolation',
    (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));
)";

bool write_all(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = write(fd, data.data() + done, data.size() - done);
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

std::unique_ptr<Browser> Browser::start(const std::string& dir, const std::string& server_ca_file,
                                        const std::string& origin, const Person& person, std::string* error) {
  auto fail = [error](const std::string& why) {
    *error = why;
    return nullptr;
  };
  const std::string nssdb = dir + "/home/.pki/nssdb";
  if (run({"mkdir", "-p", nssdb, dir + "/profile/Default"}).exit_code != 0) return fail("mkdir " + dir);
  // The person's certificate and key in the browser's own NSS database;
  // the server's CA trusted there for TLS servers, and nowhere else.
  const std::string p12 = dir + "/person.p12";
  for (const std::vector<std::string>& step :
       {std::vector<std::string>{"certutil", "-N", "-d", "sql:" + nssdb, "--empty-password"},
        {"certutil", "-A", "-d", "sql:" + nssdb, "-n", "keygate-server-ca", "-t", "C,,", "-i", server_ca_file},
        {"openssl", "pkcs12", "-export", "-in", person.cert_file, "-inkey", person.key_file, "-out", p12,
         "-passout", "pass:", "-name", "person"},
        {"pk12util", "-i", p12, "-d", "sql:" + nssdb, "-W", ""}}) {
    RunResult r = run(step);
    if (r.exit_code != 0) return fail(step[0] + " failed: " + r.err);
  }
  // Send a certificate of the keygate admin CA to this origin without
  // asking (headless Chromium has no dialog to ask with).
  write_file(dir + "/profile/Default/Preferences",
             str_cat(R"({"profile": {"content_settings": {"exceptions": {"auto_select_certificate": {")", origin,
                     R"(,*": {"setting": {"filters": [{"ISSUER": {"O": "keygate"}}]}}}}}}})"));

  signal(SIGPIPE, SIG_IGN);  // a browser that died is an error, not the test's end
  int to[2], from[2];
  if (pipe2(to, O_CLOEXEC) != 0 || pipe2(from, O_CLOEXEC) != 0) return fail("pipe");
  const std::vector<std::string> argv = {
      "/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--disable-default-apps", "--disable-extensions", "--password-store=basic", "--remote-debugging-pipe",
      "--user-data-dir=" + dir + "/profile", "--window-size=1280,800", "about:blank"};
  const std::string log = dir + "/chromium.log";
  const pid_t pid = fork();
  if (pid < 0) return fail("fork");
  if (pid == 0) {
    // The protocol: commands in on fd 3, answers and events out on fd 4.
    const int in = fcntl(to[0], F_DUPFD, 10), answers = fcntl(from[1], F_DUPFD, 10);
    dup2(in, 3);  // dup2 clears close-on-exec on 3 and 4
    dup2(answers, 4);
    const int out = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (out >= 0) {
      dup2(out, 1);
      dup2(out, 2);
    }
    const int null = ::open("/dev/null", O_RDONLY);
    if (null >= 0) dup2(null, 0);
    setenv("HOME", (dir + "/home").c_str(), 1);
    setpgid(0, 0);  // killed with its children
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(to[0]);
  close(from[1]);
  std::unique_ptr<Browser> b(new Browser());
  b->pid_ = pid;
  b->to_browser_ = to[1];
  b->from_browser_ = from[0];
  Json::Value targets = b->send("Target.getTargets", Json::Value(Json::objectValue), true);
  std::string page;
  for (const auto& t : targets["targetInfos"]) {
    if (t["type"].asString() == "page") page = t["targetId"].asString();
  }
  if (page.empty()) {
    Json::Value params(Json::objectValue);
    params["url"] = "about:blank";
    page = b->send("Target.createTarget", params, true)["targetId"].asString();
  }
  if (page.empty()) return fail("no page in the browser: " + b->last_error_ + "; " + read_file(log));
  Json::Value attach(Json::objectValue);
  attach["targetId"] = page;
  attach["flatten"] = true;
  b->session_ = b->send("Target.attachToTarget", attach, true)["sessionId"].asString();
  if (b->session_.empty()) return fail("cannot attach to the page: " + b->last_error_);
  Json::Value script(Json::objectValue);
  script["source"] = kCspRecorder;
  b->send("Page.enable", Json::Value(Json::objectValue));
  b->send("Page.addScriptToEvaluateOnNewDocument", script);
  Json::Value metrics(Json::objectValue);
  metrics["width"] = 1280;
  metrics["height"] = 800;
  metrics["deviceScaleFactor"] = 1;
  metrics["mobile"] = false;
  b->send("Emulation.setDeviceMetricsOverride", metrics);
  return b;
}

Browser::~Browser() {
  if (to_browser_ >= 0) close(to_browser_);
  if (from_browser_ >= 0) close(from_browser_);
  if (pid_ > 0) {
    kill(-pid_, SIGKILL);
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

bool Browser::read_message(Json::Value* out, int timeout_ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (true) {
    if (const size_t end = buffered_.find('\0'); end != std::string::npos) {
      auto parsed = parse_json_object(std::string_view(buffered_).substr(0, end), kMaxMessage);
      buffered_.erase(0, end + 1);
      if (!parsed.is_ok()) continue;
      *out = std::move(parsed).value();
      return true;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0 || buffered_.size() > kMaxMessage) return false;
    pollfd p{from_browser_, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left.count())) <= 0) return false;
    char chunk[65536];
    const ssize_t n = read(from_browser_, chunk, sizeof chunk);
    if (n <= 0) return false;
    buffered_.append(chunk, static_cast<size_t>(n));
  }
}

Json::Value Browser::send(const std::string& method, Json::Value params, bool browser_level) {
  Json::Value message(Json::objectValue);
  const int id = next_id_++;
  message["id"] = id;
  message["method"] = method;
  message["params"] = std::move(params);
  if (!browser_level && !session_.empty()) message["sessionId"] = session_;
  if (!write_all(to_browser_, to_json(message) + std::string(1, '\0'))) {
    last_error_ = method + ": the browser is gone";
    return Json::Value();
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    Json::Value in;
    if (!read_message(&in, 1000)) continue;
    if (!in.isMember("id") || in["id"].asInt() != id) continue;  // an event, or another answer
    if (in.isMember("error")) {
      last_error_ = method + ": " + to_json(in["error"]);
      return Json::Value();
    }
    return in["result"];
  }
  last_error_ = method + ": no answer in 20 s";
  return Json::Value();
}

Json::Value Browser::eval(const std::string& expression, std::string* error) {
  Json::Value params(Json::objectValue);
  params["expression"] = expression;
  params["awaitPromise"] = true;
  params["returnByValue"] = true;
  Json::Value r = send("Runtime.evaluate", params);
  if (r.isNull() || r.isMember("exceptionDetails")) {
    if (error != nullptr) *error = r.isNull() ? last_error_ : to_json(r["exceptionDetails"]);
    return Json::Value();
  }
  return r["result"]["value"];
}

bool Browser::wait_for(const std::string& expression, int timeout_ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    if (eval("!!(" + expression + ")").asBool()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

bool Browser::open(const std::string& url, const std::string& ready, int timeout_ms) {
  Json::Value params(Json::objectValue);
  params["url"] = url;
  send("Page.navigate", params);
  return wait_for(ready, timeout_ms);
}

bool Browser::click(const std::string& selector) {
  Json::Value at = eval(str_cat("(() => { const e = document.querySelector(", to_json(Json::Value(selector)),
                                "); if (!e) return null; e.scrollIntoView({block: 'center'});"
                                " const r = e.getBoundingClientRect();"
                                " return r.width > 0 ? [r.x + r.width / 2, r.y + r.height / 2] : null; })()"));
  if (!at.isArray()) return false;
  for (const char* type : {"mouseMoved", "mousePressed", "mouseReleased"}) {
    Json::Value e(Json::objectValue);
    e["type"] = type;
    e["x"] = at[0];
    e["y"] = at[1];
    if (std::string(type) != "mouseMoved") {
      e["button"] = "left";
      e["clickCount"] = 1;
    }
    send("Input.dispatchMouseEvent", e);
  }
  return true;
}

void Browser::type(const std::string& text) {
  Json::Value params(Json::objectValue);
  params["text"] = text;
  send("Input.insertText", params);
}

bool Browser::screenshot(const std::string& path) {
  Json::Value params(Json::objectValue);
  params["format"] = "png";
  Json::Value r = send("Page.captureScreenshot", params);
  auto png = base64_decode(r["data"].asString());
  if (!png.is_ok() || png->empty()) return false;
  write_file(path, std::string(png->begin(), png->end()));
  return true;
}

std::vector<std::string> Browser::csp_violations() {
  std::vector<std::string> out;
  for (const auto& v : eval("window.__csp || []")) out.push_back(v.asString());
  return out;
}

}  // namespace keygate::testing
