// The operators' view, end to end: the web console in a real headless
// Chromium holding a person's client certificate, /metrics read over mTLS
// and checked by Prometheus's promtool, and webhook notifications received
// by a real HTTPS server on 127.0.0.1 and their signatures checked here.
#include <openssl/hmac.h>

#include <httplib.h>

#include <condition_variable>
#include <mutex>

#include "tests/approval_fixture.h"
#include "tests/browser.h"

#include <sqlite3.h>

namespace keygate::testing {
namespace {

class OperatorsTest : public ApprovalTest {
 protected:
  std::unique_ptr<httplib::SSLClient> client_of(const std::string& who) {
    auto c = std::make_unique<httplib::SSLClient>("127.0.0.1", server_.port, folder(who) + "/cert.pem",
                                                  folder(who) + "/key.pem");
    c->set_ca_cert_path(server_.ca().c_str());
    c->enable_server_certificate_verification(true);
    c->set_connection_timeout(5);
    c->set_read_timeout(20);
    return c;
  }

  std::string origin() const { return "https://127.0.0.1:" + std::to_string(server_.port); }

  std::unique_ptr<Browser> browser_as(const std::string& who) {
    std::string error;
    auto b = Browser::start(dir_ + "/" + unique("browser-" + who), server_.ca(), origin(),
                            {folder(who) + "/cert.pem", folder(who) + "/key.pem"}, &error);
    EXPECT_TRUE(b) << error;
    return b;
  }

  // Where the run keeps this test's screenshots.
  static std::string artifact(const std::string& name) {
    const std::string folder = KEYGATE_TEST_ARTIFACTS;
    (void)run({"mkdir", "-p", folder});
    return str_cat(folder, "/", on_postgres() ? "pg-" : "", name);
  }

  // The value of one series in a /metrics text; -1 if absent.
  static double sample(const std::string& text, const std::string& series) {
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) {
      if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
    }
    return -1;
  }

  // Restarts the server on its port and state with notifications to `url`.
  void restart_with_webhook(const std::string& url, const std::string& ca, const std::string& secret_file) {
    const std::string cfg = dir_ + "/" + unique("hook-config") + ".json";
    write_file(cfg, str_cat(R"({"webhook": {"url": ")", url, R"(", "ca_file": ")", ca,
                            R"(", "secret_file": ")", secret_file, R"(", "refusal_spike": 2}})"));
    const std::string state = server_.state;
    const int port = server_.port;  // the people's admin folders name it
    server_.process.stop();
    server_ = start_server("hooked", {"--policy-file", policy_file_, "--config", cfg, "--listen",
                                      "127.0.0.1:" + std::to_string(port)}, state);
    ASSERT_GT(server_.port, 0) << read_file(server_.process.log_path());
  }

  std::string secret_file(const std::string& secret) {
    const std::string file = dir_ + "/" + unique("hook-secret");
    write_file(file, secret + "\n");
    EXPECT_EQ(chmod(file.c_str(), 0600), 0);
    return file;
  }

  std::string metrics_as(const std::string& who) {
    auto c = client_of(who);
    auto res = c->Get("/metrics");
    EXPECT_TRUE(res);
    if (!res) return "";
    EXPECT_EQ(res->status, 200) << res->body;
    EXPECT_TRUE(contains(res->get_header_value("Content-Type"), "text/plain; version=0.0.4"));
    return res->body;
  }
};

// The console, as an approver and as a viewer, against a real unlock that
// waits for it.
TEST_F(OperatorsTest, TheConsoleApprovesAWaitingUnlockAndShowsItOnTheTrail) {
  const Identity id;
  auto [vol, vid] = enrolled_under("manual");
  ASSERT_FALSE(vid.empty());
  auto waiting = unlock_waiting(vol, 90);
  const std::string rid = pending_request(vid)["request_id"].asString();
  ASSERT_FALSE(rid.empty());

  auto bob = browser_as("bob");
  ASSERT_TRUE(bob);
  const std::string row = str_cat("tr[data-request-id=\"", rid, "\"]");
  ASSERT_TRUE(bob->open(origin() + "/console/",
                        str_cat("document.body.dataset.ready === '1' && document.querySelector('", row, "')")))
      << to_json(bob->eval("document.documentElement.outerText"));
  EXPECT_EQ(bob->eval("document.getElementById('who').textContent").asString(), "Signed in as bob (approver)");
  // What the approver sees of the request: the volume, the instance and
  // what the provider vouched for.
  const std::string shown = bob->eval(str_cat("document.querySelector('", row, "').textContent")).asString();
  EXPECT_TRUE(contains(shown, vid)) << shown;
  EXPECT_TRUE(contains(shown, id.instance)) << shown;
  EXPECT_TRUE(contains(shown, "image_id: " + id.image)) << shown;
  EXPECT_TRUE(contains(shown, "policy manual")) << shown;
  EXPECT_TRUE(bob->screenshot(artifact("console-pending.png")));

  // A decision needs a reason: approve alone does nothing yet.
  ASSERT_TRUE(bob->click(row + " button.approve"));
  EXPECT_TRUE(bob->wait_for("document.getElementById('status').textContent === 'A decision needs a reason.'"));
  EXPECT_EQ(waiting.wait_for(std::chrono::milliseconds(0)), std::future_status::timeout);
  ASSERT_TRUE(bob->click(row + " input.reason"));
  bob->type("CHG-4242 planned reboot");
  ASSERT_TRUE(bob->click(row + " button.approve"));
  ASSERT_TRUE(bob->wait_for(str_cat("!document.querySelector('", row, "')")))
      << bob->eval("document.getElementById('status').textContent").asString();
  RunResult unlocked = waiting.get();
  EXPECT_EQ(unlocked.exit_code, 0) << unlocked.err;

  // The audit view: the approval, by bob, with the reason; the chain verifies.
  ASSERT_TRUE(bob->click("#tab-audit"));
  ASSERT_TRUE(bob->wait_for("document.querySelectorAll('#audit tbody tr').length > 0"));
  ASSERT_TRUE(bob->click("input[name=volume]"));
  bob->type(vid);
  ASSERT_TRUE(bob->click("#audit-apply"));
  ASSERT_TRUE(bob->wait_for(
      "[...document.querySelectorAll('#audit tbody tr')].every((r) => r.textContent.includes('" + vid + "'))"))
      << bob->eval("document.getElementById('status').textContent + ' / ' + document.querySelector('input[name=volume]').value + ' / ' + document.getElementById('audit-count').textContent").asString();
  const std::string trail = bob->eval("document.querySelector('#audit tbody').textContent").asString();
  EXPECT_TRUE(contains(trail, "approval.approve")) << trail;
  EXPECT_TRUE(contains(trail, "by bob (approver)")) << trail;
  EXPECT_TRUE(contains(trail, "CHG-4242 planned reboot")) << trail;
  EXPECT_TRUE(contains(trail, "approved by bob (" + rid + ")")) << trail;
  EXPECT_TRUE(contains(bob->eval("document.getElementById('chain').textContent").asString(), "Chain verified"));
  EXPECT_TRUE(bob->screenshot(artifact("console-audit.png")));

  // No inline script anywhere, and the CSP in force: nothing was blocked
  // while the console ran; a script put in the page now is blocked, and seen.
  EXPECT_TRUE(bob->csp_violations().empty()) << bob->csp_violations()[0];
  bob->eval("(() => { const s = document.createElement('script'); s.textContent = 'window.__ran = 1';"
            " document.body.append(s); })()");
  EXPECT_TRUE(bob->wait_for("window.__csp.length === 1", 5000));
  EXPECT_TRUE(bob->eval("window.__ran === undefined").asBool());

  // A viewer: sees the next request, no button to decide it; a request
  // forged from the page (as a script would) is refused, and so is one
  // sent as a form would send it.
  auto again = unlock_waiting(vol, 90);
  const std::string next = pending_request(vid, rid)["request_id"].asString();
  auto vic = browser_as("vic");
  ASSERT_TRUE(vic);
  const std::string next_row = str_cat("tr[data-request-id=\"", next, "\"]");
  ASSERT_TRUE(vic->open(origin() + "/console/",
                        str_cat("document.body.dataset.ready === '1' && document.querySelector('", next_row, "')")));
  EXPECT_EQ(vic->eval("document.getElementById('who').textContent").asString(), "Signed in as vic (viewer)");
  EXPECT_EQ(vic->eval("document.querySelectorAll('button.approve, button.deny, button.revoke').length").asInt(), 0);
  const std::string forge = str_cat("fetch('/v1/admin/requests/", next, "/approve', {method: 'POST', ",
                                    "headers: {'Content-Type': CT}, body: JSON.stringify({reason: 'forged'})})",
                                    ".then(async (r) => r.status + ' ' + await r.text())");
  const std::string as_script = vic->eval(std::regex_replace(forge, std::regex("CT"), "'application/json'")).asString();
  EXPECT_TRUE(contains(as_script, "403")) << as_script;
  EXPECT_TRUE(contains(as_script, "vic is viewer; this needs the approver role")) << as_script;
  const std::string as_form = vic->eval(std::regex_replace(forge, std::regex("CT"), "'text/plain'")).asString();
  EXPECT_TRUE(contains(as_form, "403")) << as_form;
  EXPECT_TRUE(contains(as_form, "Content-Type: application/json")) << as_form;
  EXPECT_TRUE(vic->csp_violations().empty()) << vic->csp_violations()[0];
  // Still pending; denied through the console by bob, the unlock ends refused.
  ASSERT_TRUE(bob->open(origin() + "/console/",
                        str_cat("document.body.dataset.ready === '1' && document.querySelector('", next_row, "')")));
  ASSERT_TRUE(bob->click(next_row + " input.reason"));
  bob->type("not expected");
  ASSERT_TRUE(bob->click(next_row + " button.deny"));
  EXPECT_EQ(again.get().exit_code, kExitRefused);
  EXPECT_TRUE(contains(audit(), "approval.deny denied volume=" + vid)) << audit();
}

// The volumes view: an admin revokes a volume with two clicks (the second
// confirms), and the unlocker is refused from then on; an approver is
// offered no revoke button.
TEST_F(OperatorsTest, TheConsoleRevokesAVolumeForAnAdminOnly) {
  auto [vol, vid] = enrolled_volume();
  ASSERT_FALSE(vid.empty());
  const std::string row = str_cat("#volumes tr[data-volume-id=\"", vid, "\"]");
  auto bob = browser_as("bob");
  ASSERT_TRUE(bob);
  ASSERT_TRUE(bob->open(origin() + "/console/#volumes",
                        str_cat("document.body.dataset.ready === '1' && document.querySelector('", row, "')")));
  EXPECT_EQ(bob->eval("document.querySelectorAll('button.revoke').length").asInt(), 0);
  auto alice = browser_as("alice");
  ASSERT_TRUE(alice);
  ASSERT_TRUE(alice->open(origin() + "/console/#volumes",
                          str_cat("document.body.dataset.ready === '1' && document.querySelector('", row, "')")));
  EXPECT_EQ(alice->eval("document.getElementById('who').textContent").asString(), "Signed in as alice (admin)");
  ASSERT_TRUE(alice->click(row + " button.revoke"));
  EXPECT_TRUE(alice->wait_for(str_cat("document.querySelector('", row, " button.revoke').textContent === 'Revoke for good?'")));
  EXPECT_EQ(unlock(vol, emulator_).exit_code, 0);  // one click revokes nothing
  ASSERT_TRUE(alice->click(row + " button.revoke"));
  ASSERT_TRUE(alice->wait_for(str_cat("document.querySelector('", row, " td:nth-child(2)').textContent === 'revoked'")))
      << alice->eval("document.getElementById('status').textContent").asString();
  RunResult refused = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url", emulator_.url()});
  EXPECT_EQ(refused.exit_code, kExitRefused) << refused.err;
  EXPECT_TRUE(contains(audit(), "revoke ok volume=" + vid + " peer=127.0.0.1 by alice (admin)")) << audit();
  EXPECT_TRUE(alice->csp_violations().empty()) << alice->csp_violations()[0];
}

// A POST from a page of another origin, with bob's certificate (as a
// browser would send it to any page that asks), changes nothing.
TEST_F(OperatorsTest, TheAdminApiRefusesCrossSiteChanges) {
  auto [vol, vid] = enrolled_under("manual");
  ASSERT_FALSE(vid.empty());
  auto waiting = unlock_waiting(vol, 60);
  const std::string rid = pending_request(vid)["request_id"].asString();
  auto bob = client_of("bob");
  const std::string path = "/v1/admin/requests/" + rid + "/approve";
  const std::string body = R"({"reason": "cross-site"})";
  struct Case {
    httplib::Headers headers;
    const char* type;
    const char* says;
  };
  const std::vector<Case> cases = {
      {{{"Origin", "https://evil.example"}}, "application/json", "another origin"},
      {{{"Origin", "null"}}, "application/json", "another origin"},
      {{{"Sec-Fetch-Site", "cross-site"}}, "application/json", "another site"},
      {{}, "text/plain", "Content-Type: application/json"},
      {{}, "application/x-www-form-urlencoded", "Content-Type: application/json"},
      {{}, "multipart/form-data; boundary=x", "Content-Type: application/json"},
  };
  for (const Case& c : cases) {
    auto res = bob->Post(path, c.headers, body, c.type);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 403) << c.type << ": " << res->body;
    EXPECT_TRUE(contains(res->body, c.says)) << res->body;
  }
  EXPECT_TRUE(contains(audit(), "admin.csrf refused")) << audit();
  // The same origin's page is let through.
  auto res = bob->Post(path, {{"Origin", origin()}, {"Sec-Fetch-Site", "same-origin"}}, body, "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
  EXPECT_EQ(waiting.get().exit_code, 0);
  // The console's pages: only for a person with a certificate in force,
  // never cached, scripts from this server only.
  httplib::SSLClient anonymous("127.0.0.1", server_.port);
  anonymous.set_ca_cert_path(server_.ca().c_str());
  anonymous.enable_server_certificate_verification(true);
  for (const char* page : {"/console/", "/console/console.js", "/metrics"}) {
    auto r = anonymous.Get(page);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 401) << page;
  }
  auto vic = client_of("vic");
  auto page = vic->Get("/console/");
  ASSERT_TRUE(page);
  EXPECT_EQ(page->status, 200);
  EXPECT_EQ(page->get_header_value("Cache-Control"), "no-store");
  EXPECT_TRUE(contains(page->get_header_value("Content-Security-Policy"), "script-src 'self'"));
  EXPECT_FALSE(contains(page->get_header_value("Content-Security-Policy"), "unsafe-inline"));
  EXPECT_EQ(page->get_header_value("X-Frame-Options"), "DENY");
  EXPECT_FALSE(std::regex_search(page->body, std::regex("<script(?![^>]*\\bsrc=)", std::regex::icase)));
  EXPECT_FALSE(std::regex_search(page->body, std::regex("\\son[a-z]+\\s*=", std::regex::icase)));
  auto missing = vic->Get("/console/../keygate.db");
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
  // The audit view's filters refuse garbage clearly.
  for (const char* q : {"?volume=%1b%5b2J", "?limit=0", "?limit=99999", "?since=abc", "?bogus=1", "?volume",
                        "?event=%zz"}) {
    auto r = vic->Get(std::string("/v1/admin/audit") + q);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 400) << q << ": " << r->body;
  }
}

TEST_F(OperatorsTest, MetricsPassPromtoolAndCountWhatHappens) {
  const std::string before = metrics_as("vic");
  // Prometheus's own checker: the format and its naming conventions.
  const std::string file = dir_ + "/" + unique("metrics") + ".txt";
  write_file(file, before);
  RunResult checked = run({"sh", "-c", "promtool check metrics < " + file});
  EXPECT_EQ(checked.exit_code, 0) << checked.out << checked.err << before;
  EXPECT_NE(sample(before, "keygate_releases_total{platform=\"aws\"}"), -1) << before;

  auto [vol, vid] = enrolled_volume();
  ASSERT_FALSE(vid.empty());
  RunResult ok = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url", emulator_.url()});
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  RunResult revoke = admin("alice", {"revoke", vid});
  ASSERT_EQ(revoke.exit_code, 0) << revoke.err;
  RunResult refused = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url", emulator_.url()});
  EXPECT_EQ(refused.exit_code, kExitRefused);
  auto [pending_vol, pending_vid] = enrolled_under("manual");
  auto waiting = unlock_waiting(pending_vol, 60);
  const std::string rid = pending_request(pending_vid)["request_id"].asString();
  ASSERT_EQ(admin("bob", {"deny", rid, "--reason", "metrics test"}).exit_code, 0);
  EXPECT_EQ(waiting.get().exit_code, kExitRefused);

  const std::string after = metrics_as("vic");
  write_file(file, after);
  checked = run({"sh", "-c", "promtool check metrics < " + file});
  EXPECT_EQ(checked.exit_code, 0) << checked.out << checked.err << after;
  auto moved = [&](const std::string& series) {
    return sample(after, series) - std::max(0.0, sample(before, series));
  };
  EXPECT_EQ(moved("keygate_releases_total{platform=\"aws\"}"), 1) << after;
  EXPECT_EQ(moved("keygate_refusals_total{platform=\"aws\",reason=\"revoked\"}"), 1) << after;
  EXPECT_EQ(moved("keygate_refusals_total{platform=\"aws\",reason=\"approval_denied\"}"), 1) << after;
  EXPECT_EQ(moved("keygate_approval_requests_total{state=\"pending\"}"), 1) << after;
  EXPECT_EQ(moved("keygate_approval_requests_total{state=\"denied\"}"), 1) << after;
  EXPECT_EQ(moved("keygate_approval_wait_seconds_count"), 1) << after;
  EXPECT_GE(moved("keygate_unlock_duration_seconds_count"), 3) << after;
  EXPECT_GE(moved("keygate_store_duration_seconds_count{op=\"audit_append\"}"), 3) << after;
  EXPECT_GE(sample(after, "keygate_open_connections"), 1) << after;
  EXPECT_GE(sample(after, "keygate_outstanding_nonces"), 0) << after;
  EXPECT_EQ(sample(after, "keygate_audit_write_failures_total"), 0) << after;
}

// A webhook receiver on 127.0.0.1 over TLS with a CA of its own.
class Receiver {
 public:
  struct Delivery {
    std::string event, signature, body;
  };
  explicit Receiver(const std::string& dir) : dir_(dir) {
    (void)run({"mkdir", "-p", dir});
    const std::string cfg = dir + "/san.cnf";
    write_file(cfg, "subjectAltName=IP:127.0.0.1\n");
    for (const std::vector<std::string>& step :
         {std::vector<std::string>{"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                                   "-nodes", "-keyout", dir + "/ca.key", "-out", ca(), "-subj", "/CN=receiver CA",
                                   "-days", "2"},
          {"openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
           dir + "/key.pem", "-out", dir + "/req.pem", "-subj", "/CN=127.0.0.1"},
          {"openssl", "x509", "-req", "-in", dir + "/req.pem", "-CA", ca(), "-CAkey", dir + "/ca.key",
           "-CAcreateserial", "-out", dir + "/cert.pem", "-days", "2", "-extfile", cfg}}) {
      RunResult r = run(step);
      EXPECT_EQ(r.exit_code, 0) << r.err;
    }
    server_ = std::make_unique<httplib::SSLServer>((dir + "/cert.pem").c_str(), (dir + "/key.pem").c_str());
    server_->Post("/hook", [this](const httplib::Request& req, httplib::Response& res) {
      std::lock_guard<std::mutex> lock(mu_);
      got_.push_back({req.get_header_value("X-Keygate-Event"), req.get_header_value("X-Keygate-Signature"), req.body});
      res.set_content("{}", "application/json");
    });
    // A receiver gone bad: it takes the request and never answers (until
    // this receiver stops).
    server_->Post("/hang", [this](const httplib::Request&, httplib::Response& res) {
      std::unique_lock<std::mutex> lock(mu_);
      ++hung_;
      released_.wait_for(lock, std::chrono::seconds(60), [this] { return stopping_; });
      res.status = 503;
    });
    port_ = server_->bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_->listen_after_bind(); });
  }
  ~Receiver() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    released_.notify_all();
    server_->stop();
    thread_.join();
  }
  std::string ca() const { return dir_ + "/ca.pem"; }
  std::string url(const char* path = "/hook") const { return str_cat("https://127.0.0.1:", port_, path); }
  int hung() {
    std::lock_guard<std::mutex> lock(mu_);
    return hung_;
  }
  // The deliveries of `event` so far, waiting up to 20 s for at least `n`.
  std::vector<Delivery> wait_for(const std::string& event, size_t n) {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (true) {
      std::vector<Delivery> out;
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (const auto& d : got_) {
          if (d.event == event) out.push_back(d);
        }
      }
      if (out.size() >= n || std::chrono::steady_clock::now() > give_up) return out;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

 private:
  std::string dir_;
  std::unique_ptr<httplib::SSLServer> server_;
  int port_ = 0;
  std::thread thread_;
  std::mutex mu_;
  std::vector<Delivery> got_;
  std::condition_variable released_;
  bool stopping_ = false;
  int hung_ = 0;
};

// "t=T,sha256=HEX" checked as a receiver would, with OpenSSL's HMAC.
bool signature_holds(const std::string& header, const std::string& secret, const std::string& body) {
  std::smatch m;
  if (!std::regex_match(header, m, std::regex("t=([0-9]+),sha256=([0-9a-f]{64})"))) return false;
  const std::string text = m[1].str() + "." + body;
  unsigned char mac[32];
  unsigned int size = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()), reinterpret_cast<const unsigned char*>(text.data()),
       text.size(), mac, &size);
  return hex_encode(mac, size) == m[2].str();
}

TEST_F(OperatorsTest, WebhookNotificationsArriveSignedAndAHungReceiverDelaysNothing) {
  Receiver receiver(dir_ + "/" + unique("receiver"));
  const std::string secret = "webhook-secret-of-at-least-32-bytes-" + unique("s");
  const std::string secret_path = secret_file(secret);
  auto restart_with = [&](const std::string& url) { restart_with_webhook(url, receiver.ca(), secret_path); };
  restart_with(receiver.url());
  auto [vol, vid] = enrolled_under("manual");
  ASSERT_FALSE(vid.empty());
  auto waiting = unlock_waiting(vol, 60);
  const std::string rid = pending_request(vid)["request_id"].asString();
  ASSERT_EQ(admin("bob", {"approve", rid, "--reason", "hooked"}).exit_code, 0);
  EXPECT_EQ(waiting.get().exit_code, 0);
  auto denied_wait = unlock_waiting(vol, 60);
  const std::string next = pending_request(vid, rid)["request_id"].asString();
  ASSERT_EQ(admin("carol", {"deny", next, "--reason", "not now"}).exit_code, 0);
  EXPECT_EQ(denied_wait.get().exit_code, kExitRefused);
  // A second refusal within the minute: a spike (the threshold is 2).
  auto [gone, gone_id] = enrolled_volume();
  ASSERT_EQ(admin("alice", {"revoke", gone_id}).exit_code, 0);
  EXPECT_EQ(run({bin("keygate"), "unlock", gone, "--verify-only", "--metadata-url", emulator_.url()}).exit_code,
            kExitRefused);

  const auto requested = receiver.wait_for("approval.requested", 2);
  const auto approved = receiver.wait_for("approval.approved", 1);
  const auto denied = receiver.wait_for("approval.denied", 1);
  const auto spike = receiver.wait_for("refusals.spike", 1);
  ASSERT_EQ(requested.size(), 2u);
  ASSERT_EQ(approved.size(), 1u);
  ASSERT_EQ(denied.size(), 1u);
  ASSERT_EQ(spike.size(), 1u);
  EXPECT_TRUE(signature_holds(spike[0].signature, secret, spike[0].body)) << spike[0].body;
  EXPECT_EQ(parse_json_object(spike[0].body, 1 << 20).value()["refusals"].asInt(), 2) << spike[0].body;
  for (const auto* list : {&requested, &approved, &denied}) {
    for (const auto& d : *list) {
      EXPECT_TRUE(signature_holds(d.signature, secret, d.body)) << d.signature << " " << d.body;
      EXPECT_FALSE(signature_holds(d.signature, secret, d.body + " ")) << "a changed body must not verify";
      auto body = parse_json_object(d.body, 1 << 20);
      ASSERT_TRUE(body.is_ok()) << d.body;
      EXPECT_EQ(body->get("type", "").asString(), d.event);
      EXPECT_EQ(body.value()["request"]["volume_id"].asString(), vid);
    }
  }
  EXPECT_EQ(parse_json_object(requested[0].body, 1 << 20).value()["request"]["request_id"].asString(), rid);
  auto approval = parse_json_object(approved[0].body, 1 << 20).value();
  EXPECT_EQ(approval["by"].asString(), "bob");
  EXPECT_EQ(approval["reason"].asString(), "hooked");
  EXPECT_EQ(approval["request"]["state"].asString(), "approved");
  EXPECT_EQ(parse_json_object(denied[0].body, 1 << 20).value()["by"].asString(), "carol");

  // A receiver that takes each notification and never answers: every
  // attempt waits out its 5 s timeout, and is retried; the unlocks, the
  // approval and the refusals beside it take no longer for that.
  restart_with(receiver.url("/hang"));
  auto again = unlock_waiting(vol, 60);
  const std::string third = pending_request(vid, next)["request_id"].asString();  // notified: stuck
  ASSERT_EQ(admin("bob", {"approve", third, "--reason", "receiver down"}).exit_code, 0);
  RunResult released = again.get();
  EXPECT_EQ(released.exit_code, 0) << released.err;
  auto [plain, plain_id] = enrolled_volume();
  for (int i = 0; i < 3; ++i) {
    RunResult r = run({bin("keygate"), "unlock", plain, "--verify-only", "--metadata-url", emulator_.url()});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_LT(r.seconds, 4.0) << "an unlock waited on the receiver";
  }
  ASSERT_EQ(admin("alice", {"revoke", plain_id}).exit_code, 0);
  for (int i = 0; i < 3; ++i) {  // refusals enough for a spike, sent to the receiver that hangs
    RunResult r = run({bin("keygate"), "unlock", plain, "--verify-only", "--metadata-url", emulator_.url()});
    EXPECT_EQ(r.exit_code, kExitRefused);
    EXPECT_LT(r.seconds, 4.0) << "a refusal waited on the receiver";
  }
  // Meanwhile the notifications were being tried, and timed out.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!contains(read_file(server_.process.log_path()), "webhook: approval.requested") &&
         std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  const std::string log = read_file(server_.process.log_path());
  EXPECT_TRUE(contains(log, "webhook: approval.requested")) << log;
  EXPECT_GE(receiver.hung(), 1);

  // A receiver that is gone (nothing listens): the same.
  restart_with("https://127.0.0.1:1/hook");
  RunResult refused = run({bin("keygate"), "unlock", plain, "--verify-only", "--metadata-url", emulator_.url()});
  EXPECT_EQ(refused.exit_code, kExitRefused);
  auto later = unlock_waiting(vol, 60);
  const std::string fourth = pending_request(vid, third)["request_id"].asString();
  ASSERT_EQ(admin("bob", {"approve", fourth, "--reason", "receiver gone"}).exit_code, 0);
  EXPECT_EQ(later.get().exit_code, 0);
}

// The trail refusing a record (a full disk) is notified and counted; the
// key stays where it is.
TEST_F(OperatorsTest, AnAuditWriteFailureIsNotifiedAndCounted) {
  Receiver receiver(dir_ + "/" + unique("receiver"));
  const std::string secret = "webhook-secret-of-at-least-32-bytes-" + unique("s");
  restart_with_webhook(receiver.url(), receiver.ca(), secret_file(secret));
  auto [vol, vid] = enrolled_volume();
  ASSERT_FALSE(vid.empty());
  const std::string full = on_postgres()
      ? "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'disk full'; END$$; "
        "CREATE TRIGGER full_disk BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION disk_full()"
      : "CREATE TRIGGER full_disk BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END";
  const std::string drop = on_postgres() ? "DROP TRIGGER full_disk ON audit" : "DROP TRIGGER full_disk";
  auto sql = [&](const std::string& text) {
    if (on_postgres()) return store_sql(server_.state, text);
    sqlite3* db = nullptr;
    std::string error;
    if (sqlite3_open((server_.state + "/keygate.db").c_str(), &db) != SQLITE_OK) error = "open";
    char* message = nullptr;
    if (error.empty() && sqlite3_exec(db, text.c_str(), nullptr, nullptr, &message) != SQLITE_OK) {
      error = message != nullptr ? message : "exec";
    }
    sqlite3_free(message);
    sqlite3_close(db);
    return error;
  };
  ASSERT_EQ(sql(full), "");
  RunResult held = run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url", emulator_.url(),
                        "--timeout", "5", "--deadline", "3"});
  ASSERT_EQ(sql(drop), "");
  EXPECT_NE(held.exit_code, 0);
  EXPECT_TRUE(contains(held.err, "audit_unavailable")) << held.err;
  const auto failed = receiver.wait_for("audit.write_failed", 1);
  ASSERT_GE(failed.size(), 1u) << read_file(server_.process.log_path());
  EXPECT_TRUE(signature_holds(failed[0].signature, secret, failed[0].body));
  auto body = parse_json_object(failed[0].body, 1 << 20);
  ASSERT_TRUE(body.is_ok());
  EXPECT_EQ(body.value()["event"].asString(), "unlock");
  EXPECT_EQ(body.value()["outcome"].asString(), "released");
  EXPECT_EQ(body.value()["volume_id"].asString(), vid);
  EXPECT_GE(sample(metrics_as("vic"), "keygate_audit_write_failures_total"), 1);
  EXPECT_EQ(run({bin("keygate"), "unlock", vol, "--verify-only", "--metadata-url", emulator_.url()}).exit_code, 0);
}

}  // namespace
}  // namespace keygate::testing
