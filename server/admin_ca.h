// The admin CA: the certificates people present to the admin API (mTLS).
// Its key and certificate live in the state folder's admin-ca.key (0600;
// made once, whole or not at all), its certificate alone in admin-ca.pem.
// A certificate names a person (CN) and one role (OU); the store records
// every certificate issued, and the server accepts only those it recorded
// and has not revoked.
#pragma once

#include <openssl/x509.h>

#include <string>

#include "core/secret.h"
#include "core/status.h"
#include "server/approvals.h"
#include "server/policy.h"
#include "server/store.h"

namespace keygate::server {

constexpr int kDefaultAdminCertDays = 365;
constexpr int kMaxAdminCertDays = 3650;

class AdminCa {
 public:
  // Loads the CA from `state_dir`, making it first if there is none.
  static Result<AdminCa> load_or_create(const std::string& state_dir);

  const std::string& cert_pem() const { return cert_pem_; }
  const std::string& cert_file() const { return cert_file_; }

  struct Issued {
    std::string cert_pem;
    AdminCertRecord record;
  };
  // A client certificate for `public_key` (a PEM public key) naming `name`
  // with `role`, valid for `days`; the record to store says who issued it.
  Result<Issued> issue(std::string_view public_key_pem, const std::string& name, AdminRole role, int days,
                       const std::string& issued_by, int64_t now) const;

 private:
  AdminCa(SecretBuffer key_pem, std::string cert_pem, std::string cert_file)
      : key_pem_(std::move(key_pem)), cert_pem_(std::move(cert_pem)), cert_file_(std::move(cert_file)) {}
  SecretBuffer key_pem_;
  std::string cert_pem_;
  std::string cert_file_;
};

// What a verified client certificate says: its serial (hex), CN and OU.
struct AdminPeer {
  std::string serial;
  std::string name;
  std::string role;
};
AdminPeer admin_peer_of(X509* cert);

// The person `peer` is, if the store recorded its certificate with that
// name and role and has not revoked it (kRefused, saying why, otherwise).
Result<AdminIdentity> authenticate_admin(Store& store, const AdminPeer& peer, int64_t now);

}  // namespace keygate::server
