// A throwaway PostgreSQL cluster for the tests (tests/pg_cluster.sh: Debian's
// PostgreSQL, made with initdb in a folder of its own under /tmp, on a Unix
// socket in that folder only, no TCP). Each test takes a database of its own.
#pragma once

#include <memory>
#include <string>

struct pg_conn;  // libpq's PGconn

namespace keygate::testing {

class PgCluster {
 public:
  // The run's cluster: the one ctest started (its folder named in the build
  // tree's test-pg-cluster, or the file KEYGATE_TEST_PG_FILE names), or
  // else one started on first use and stopped when the process exits.
  static PgCluster& shared();
  // A cluster of this test's own, stopped when the object goes: for a test
  // that stops its database.
  static std::unique_ptr<PgCluster> start_own();
  ~PgCluster();

  // "" when the cluster is up; otherwise what went wrong.
  const std::string& error() const { return error_; }
  // A new, empty database; its connection string (no password: the
  // cluster trusts local connections). "" on failure.
  std::string create_database();
  std::string conninfo(const std::string& database) const;
  // Runs SQL on the database `conninfo` names; "" or libpq's error.
  static std::string exec(const std::string& conninfo, const std::string& sql);
  // The first column of the first row SQL returns ("" if none or on error).
  static std::string query(const std::string& conninfo, const std::string& sql);

  // Stops the server (fast shutdown: open connections are cut) and starts
  // it again on the same socket and data; "" or the error.
  std::string stop();
  // `options`: more server settings for this start ("-c name=value ...",
  // after the defaults, so they win).
  std::string start(const std::string& options = "");
  // The cluster's data folder (owned by the postgres user).
  std::string data_dir() const { return dir_ + "/data"; }

 private:
  PgCluster() = default;
  std::string pg_ctl(const std::string& action, const std::string& options = "");

  std::string file_;  // pg_cluster.sh's file naming the folder
  std::string dir_;
  std::string error_;
  bool owned_ = false;
  int databases_ = 0;
};

// A client of its own that runs `sql` (BEGIN and a LOCK, say) and keeps its
// session, and the transaction with it, open until the object goes:
// another program holding what `sql` took.
class PgSession {
 public:
  PgSession(const std::string& conninfo, const std::string& sql);
  ~PgSession();
  PgSession(const PgSession&) = delete;
  PgSession& operator=(const PgSession&) = delete;
  // "" when `sql` ran; otherwise libpq's error.
  const std::string& error() const { return error_; }

 private:
  ::pg_conn* conn_ = nullptr;
  std::string error_;
};

}  // namespace keygate::testing
