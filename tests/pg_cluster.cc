#include "tests/pg_cluster.h"

#include <libpq-fe.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "tests/harness.h"

namespace keygate::testing {
namespace {

constexpr char kBinDir[] = "/usr/lib/postgresql/15/bin/";

std::string script() { return std::string(KEYGATE_SOURCE_DIR) + "/tests/pg_cluster.sh"; }

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

}  // namespace

std::unique_ptr<PgCluster> PgCluster::start_own() {
  std::unique_ptr<PgCluster> c(new PgCluster());
  char tmpl[] = "/tmp/keygate-pg-file-XXXXXX";
  const int fd = mkstemp(tmpl);
  if (fd >= 0) close(fd);
  c->file_ = tmpl;
  c->owned_ = true;
  RunResult r = run({script(), "start", c->file_});
  if (r.exit_code != 0) {
    c->error_ = "starting a PostgreSQL cluster failed: " + r.err;
    return c;
  }
  c->dir_ = trim(read_file(c->file_));
  return c;
}

PgCluster& PgCluster::shared() {
  static PgCluster* cluster = [] {
    const char* env = getenv("KEYGATE_TEST_PG_FILE");
    const std::string file = env != nullptr && *env != '\0' ? env : KEYGATE_TEST_PG_FILE;
    if (access(file.c_str(), F_OK) != 0) {
      PgCluster* own = start_own().release();
      std::atexit([] { delete &shared(); });
      return own;
    }
    auto* c = new PgCluster();
    c->file_ = file;
    c->dir_ = trim(read_file(file));
    if (c->dir_.empty()) c->error_ = "no cluster named in " + file + " (ctest's fixture pg.start)";
    return c;
  }();
  return *cluster;
}

PgCluster::~PgCluster() {
  if (owned_) (void)run({script(), "stop", file_});
}

std::string PgCluster::pg_ctl(const std::string& action, const std::string& options) {
  std::vector<std::string> argv = {"runuser",
                                   "-u",
                                   "postgres",
                                   "--",
                                   std::string(kBinDir) + "pg_ctl",
                                   "-D",
                                   dir_ + "/data",
                                   "-l",
                                   dir_ + "/server.log",
                                   "-w",
                                   "-t",
                                   "60"};
  if (action == "start") {
    argv.insert(argv.end(),
                {"-o", "-k " + dir_ + " -c listen_addresses='' -c max_connections=400 " + options});
  } else {
    argv.insert(argv.end(), {"-m", "fast"});
  }
  argv.push_back(action);
  RunResult r = run(argv);
  return r.exit_code == 0 ? "" : "pg_ctl " + action + " failed: " + r.out + r.err;
}

std::string PgCluster::stop() { return pg_ctl("stop"); }
std::string PgCluster::start(const std::string& options) { return pg_ctl("start", options); }

std::string PgCluster::conninfo(const std::string& database) const {
  return "host=" + dir_ + " user=postgres dbname=" + database;
}

std::string PgCluster::create_database() {
  static std::mutex mu;
  std::string name;
  {
    std::lock_guard<std::mutex> lock(mu);
    name = "keygate_" + std::to_string(getpid()) + "_" + std::to_string(++databases_);
  }
  // Two CREATE DATABASE at once (parallel tests) may find the template in
  // use: try again for a while.
  std::string err;
  for (int attempt = 0; attempt < 50; ++attempt) {
    err = exec(conninfo("postgres"), "CREATE DATABASE " + name);
    if (err.empty()) return conninfo(name);
    usleep(100 * 1000);
  }
  fprintf(stderr, "CREATE DATABASE %s: %s\n", name.c_str(), err.c_str());
  return "";
}

std::string PgCluster::exec(const std::string& conninfo, const std::string& sql) {
  return PgSession(conninfo, sql).error();  // run, then the session closes
}

std::string PgCluster::query(const std::string& conninfo, const std::string& sql) {
  PGconn* c = PQconnectdb(conninfo.c_str());
  std::string out;
  if (PQstatus(c) == CONNECTION_OK) {
    PGresult* r = PQexec(c, sql.c_str());
    if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0) out = PQgetvalue(r, 0, 0);
    PQclear(r);
  }
  PQfinish(c);
  return out;
}

PgSession::PgSession(const std::string& conninfo, const std::string& sql) {
  conn_ = PQconnectdb(conninfo.c_str());
  if (PQstatus(conn_) != CONNECTION_OK) {
    error_ = PQerrorMessage(conn_);
    return;
  }
  PGresult* r = PQexec(conn_, sql.c_str());
  const ExecStatusType st = PQresultStatus(r);
  if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) error_ = PQresultErrorMessage(r);
  PQclear(r);
}

PgSession::~PgSession() { PQfinish(conn_); }

}  // namespace keygate::testing
