// The server's configuration file: every key of its type and range, and a
// clear error (never an exception out of the JSON library) otherwise.
#include "server/settings.h"

#include <gtest/gtest.h>

namespace keygate::server {
namespace {

TEST(SettingsTest, ReadsEveryKey) {
  auto s = parse_settings(R"({"listen": "0.0.0.0:443", "state_dir": "/srv/kg", "nonce_ttl": 30,
      "evidence_max_age": 600, "pending_ttl": 3600, "tls_san": ["DNS:keys.example"],
      "aws_trust_dirs": ["/etc/kg/aws"], "gcp_jwks_files": ["/etc/kg/g.json"],
      "azure_trust_dirs": ["/etc/kg/az"],
      "rate_limits": {"per_source": {"per_second": 0, "burst": 1}},
      "connections": {"max": 100, "per_source": 10},
      "webhook": {"url": "https://hooks.example/keygate", "ca_file": "/etc/kg/hook-ca.pem",
                  "secret_file": "/etc/kg/hook.secret", "refusal_spike": 5}})");
  ASSERT_TRUE(s.is_ok()) << s.status().message();
  EXPECT_EQ(s->listen, "0.0.0.0:443");
  EXPECT_EQ(s->state_dir, "/srv/kg");
  EXPECT_EQ(s->nonce_ttl, 30);
  EXPECT_EQ(s->evidence_max_age, 600);
  EXPECT_EQ(s->pending_ttl, 3600);
  EXPECT_EQ(s->tls_san, std::vector<std::string>{"DNS:keys.example"});
  EXPECT_EQ(s->gcp_jwks_files, std::vector<std::string>{"/etc/kg/g.json"});
  EXPECT_EQ(s->per_source.per_second, 0);
  EXPECT_EQ(s->max_connections, 100);
  EXPECT_EQ(s->max_connections_per_source, 10);
  EXPECT_EQ(s->webhook.url, "https://hooks.example/keygate");
  EXPECT_EQ(s->webhook.ca_file, "/etc/kg/hook-ca.pem");
  EXPECT_EQ(s->webhook.secret_file, "/etc/kg/hook.secret");
  EXPECT_EQ(s->webhook.refusal_spike, 5);
}

// The shipped examples are configurations this server takes.
TEST(SettingsTest, TheExamplesParse) {
  for (const char* name : {"server.json", "server-postgresql.json"}) {
    FILE* f = fopen((std::string(KEYGATE_SOURCE_DIR) + "/examples/" + name).c_str(), "r");
    ASSERT_NE(f, nullptr) << name;
    std::string text;
    char buf[4096];
    for (size_t n; (n = fread(buf, 1, sizeof(buf), f)) > 0;) text.append(buf, n);
    fclose(f);
    auto s = parse_settings(text);
    EXPECT_TRUE(s.is_ok()) << name << ": " << s.status().message();
  }
  auto pg = parse_settings(
      R"({"store": "host=db dbname=keygate sslmode=verify-full", "store_connections": 4})");
  ASSERT_TRUE(pg.is_ok()) << pg.status().message();
  EXPECT_EQ(pg->store, "host=db dbname=keygate sslmode=verify-full");
  EXPECT_EQ(pg->store_connections, 4);
}

TEST(SettingsTest, AnEmptyObjectKeepsTheDefaults) {
  auto s = parse_settings("{}");
  ASSERT_TRUE(s.is_ok());
  EXPECT_EQ(s->listen, "127.0.0.1:8443");
  EXPECT_EQ(s->nonce_ttl, 60);
  EXPECT_EQ(s->pending_ttl, 86400);
}

// Each of these once threw out of jsoncpp (asString on an object, asInt
// past its range) and aborted the server, or was taken as it was (a
// negative nonce lifetime expires every challenge at once).
TEST(SettingsTest, AValueOfTheWrongTypeOrRangeIsAClearError) {
  const std::pair<const char*, const char*> cases[] = {
      {R"({"listen": {}})", "'listen' must be a string"},
      {R"({"state_dir": [1]})", "'state_dir' must be a string"},
      {R"({"listen": ""})", "'listen' must be a string"},
      {R"({"nonce_ttl": -5})", "'nonce_ttl' must be whole seconds, from 1 to 3600"},
      {R"({"nonce_ttl": 1e30})", "'nonce_ttl' must be whole seconds"},
      {R"({"nonce_ttl": 30.5})", "'nonce_ttl' must be whole seconds"},
      {R"({"evidence_max_age": "x"})", "'evidence_max_age' must be whole seconds"},
      {R"({"pending_ttl": 59})", "'pending_ttl' must be whole seconds, from 60"},
      {R"({"tls_san": "DNS:a"})", "'tls_san' must be a list of strings"},
      {R"({"tls_san": ["DNS:a\u001b[31m"]})", "'tls_san' must be a list of strings"},
      {R"({"connections": {"max": 5, "per_source": 6}})", "per_source is more than max"},
      {R"({"rate_limits": {"per_source": {"per_second": -1, "burst": 1}}})", "per_second from 0"},
      {R"({"enroll_by_attestation": {}})", "must be a list of rules"},
      {R"({"store": "host=/run/pg dbname=k password=s3cret"})",
       "'store' the PostgreSQL connection string holds a password"},
      {R"({"store": "postgresql://k:s3cret@db/k"})", "password file"},
      {R"({"store": "host='unterminated"})", "'store' bad PostgreSQL connection string"},
      {R"({"store": 5})", "'store' must be a string"},
      {R"({"store_connections": 0})", "'store_connections' must be a whole number from 1 to 256"},
      {R"({"store_connections": 257})", "'store_connections' must be a whole number from 1 to 256"},
      {R"({"webhook": "https://x"})", "webhook: must be an object"},
      {R"({"webhook": {"url": "https://x/h"}})", "webhook: needs url, ca_file and secret_file"},
      {R"({"webhook": {"url": "http://x/h", "ca_file": "c", "secret_file": "s"}})", "url must be https://"},
      {R"({"webhook": {"url": "https://x/h", "ca_file": "c", "secret_file": "s", "secret": "s3cret"}})",
       "webhook: unknown key 'secret'"},
      {R"({"webhook": {"url": "https://x/h[2J", "ca_file": "c", "secret_file": "s"}})", "printable"},
      {R"({"webhook": {"url": "https://x/h", "ca_file": "c", "secret_file": "s", "refusal_spike": -1}})",
       "refusal_spike must be a whole number"},
      {"[]", "JSON"},
      {"{", "JSON"},
  };
  for (const auto& [text, expected] : cases) {
    auto s = parse_settings(text);
    ASSERT_FALSE(s.is_ok()) << text;
    EXPECT_EQ(s.status().kind(), ErrorKind::kInvalidArgument) << text;
    EXPECT_NE(s.status().message().find(expected), std::string::npos)
        << text << " -> " << s.status().message();
    EXPECT_EQ(s.status().message().find("s3cret"), std::string::npos) << s.status().message();
  }
}

TEST(SettingsTest, AnUnknownKeyIsNamedPrintably) {
  auto s = parse_settings("{\"nonce-ttl\u001b[2J\": 5}");
  ASSERT_FALSE(s.is_ok());
  EXPECT_EQ(s.status().message(), "unknown key 'nonce-ttl\\x1b[2J'");
}

}  // namespace
}  // namespace keygate::server
