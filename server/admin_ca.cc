#include "server/admin_ca.h"

#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "core/crypto.h"
#include "core/encoding.h"
#include "core/file.h"
#include "server/state_files.h"
#include "server/x509_util.h"

namespace keygate::server {
namespace {

constexpr size_t kMaxCaFile = 64 * 1024;

std::string_view text_of(const SecretBuffer& b) {
  return std::string_view(reinterpret_cast<const char*>(b.data()), b.size());
}

// A new CA: its key's PEM followed by its certificate's, in one buffer.
Result<SecretBuffer> new_ca_file() {
  OwnedPkey key = generate_p256();
  if (!key) return Status::error(ErrorKind::kInternal, "EC key generation");
  auto cert = make_cert(key.get(), {{"O", "keygate"}, {"CN", "keygate admin CA " + hex_encode(random_bytes(4))}},
                        nullptr, 3650);
  if (!cert.is_ok()) return cert.status();
  X509* c = cert->get();
  KEYGATE_RETURN_IF_ERROR(add_ext(c, c, NID_basic_constraints, "critical,CA:TRUE,pathlen:0"));
  KEYGATE_RETURN_IF_ERROR(add_ext(c, c, NID_key_usage, "critical,keyCertSign,cRLSign"));
  KEYGATE_RETURN_IF_ERROR(add_ext(c, c, NID_subject_key_identifier, "hash"));
  if (X509_sign(c, key.get(), EVP_sha256()) == 0) return Status::error(ErrorKind::kInternal, "sign admin CA");
  auto key_pem = pem_of_key(key.get());
  if (!key_pem.is_ok()) return key_pem.status();
  const std::string cert_pem = pem_of_cert(c);
  auto both = SecretBuffer::allocate(key_pem->size() + cert_pem.size());
  if (!both.is_ok()) return both.status();
  std::copy(key_pem->data(), key_pem->data() + key_pem->size(), both->data());
  std::copy(cert_pem.begin(), cert_pem.end(), both->data() + key_pem->size());
  return both;
}

}  // namespace

Result<AdminCa> AdminCa::load_or_create(const std::string& state_dir) {
  const std::string key_file = state_dir + "/admin-ca.key";
  const std::string cert_file = state_dir + "/admin-ca.pem";
  struct stat st;
  if (stat(key_file.c_str(), &st) != 0) {
    if (errno != ENOENT) return Status::error(ErrorKind::kIo, str_cat("stat ", key_file, ": ", strerror(errno)));
    auto made = new_ca_file();
    if (!made.is_ok()) return made.status();
    Status created = create_secret_file_exclusively(key_file, made.value());
    // Another process made it first: that one is the CA.
    if (!created.is_ok() && created.kind() != ErrorKind::kConflict) return created.with_context("admin CA");
  } else if ((st.st_mode & 077) != 0) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat(key_file, " is readable by group or others; chmod 600 it"));
  }
  auto existing = read_secret_file(key_file, kMaxCaFile, false);
  if (!existing.is_ok()) return existing.status().with_context("admin CA");
  const std::string_view all = text_of(existing.value());
  const size_t at = all.find("-----BEGIN CERTIFICATE-----");
  if (at == std::string_view::npos) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat(key_file, ": no certificate after the key"));
  }
  auto key_pem = SecretBuffer::copy_of(all.data(), at);
  if (!key_pem.is_ok()) return key_pem.status();
  std::string cert_pem(all.substr(at));
  auto cert = cert_from_pem(cert_pem);
  auto key = key_from_pem(key_pem.value());
  if (!cert.is_ok() || !key.is_ok() || X509_check_private_key(cert->get(), key->get()) != 1) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat(key_file, ": not a key and its certificate"));
  }
  cert_pem = pem_of_cert(cert->get());
  auto published = read_small_file(cert_file, kMaxCaFile);
  if (!published.is_ok() || published.value() != cert_pem) {
    KEYGATE_RETURN_IF_ERROR(write_file_atomically(cert_file, cert_pem, 0644));
  }
  return AdminCa(std::move(key_pem).value(), std::move(cert_pem), cert_file);
}

Result<AdminCa::Issued> AdminCa::issue(std::string_view public_key_pem, const std::string& name, AdminRole role,
                                       int days, const std::string& issued_by, int64_t now) const {
  if (!is_admin_name(name)) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("name '", printable(name, 80), "': use 1 to ", kMaxAdminNameLength,
                                 " letters, digits, '.', '_', '@' or '-'"));
  }
  if (days < 1 || days > kMaxAdminCertDays) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("days: 1 to ", kMaxAdminCertDays));
  }
  auto subject_key = public_key_from_pem(public_key_pem);
  if (!subject_key.is_ok()) return subject_key.status();
  auto ca_cert = cert_from_pem(cert_pem_);
  auto ca_key = key_from_pem(key_pem_);
  if (!ca_cert.is_ok() || !ca_key.is_ok()) return Status::error(ErrorKind::kInternal, "admin CA unreadable");
  auto cert = make_cert(subject_key->get(), {{"O", "keygate admin"}, {"OU", admin_role_name(role)}, {"CN", name}},
                        ca_cert->get(), days);
  if (!cert.is_ok()) return cert.status();
  X509* c = cert->get();
  X509* ca = ca_cert->get();
  KEYGATE_RETURN_IF_ERROR(add_ext(c, ca, NID_basic_constraints, "critical,CA:FALSE"));
  KEYGATE_RETURN_IF_ERROR(add_ext(c, ca, NID_key_usage, "critical,digitalSignature"));
  KEYGATE_RETURN_IF_ERROR(add_ext(c, ca, NID_ext_key_usage, "clientAuth"));
  KEYGATE_RETURN_IF_ERROR(add_ext(c, ca, NID_authority_key_identifier, "keyid"));
  if (X509_sign(c, ca_key->get(), EVP_sha256()) == 0) {
    return Status::error(ErrorKind::kInternal, "sign admin certificate");
  }
  Issued out;
  out.cert_pem = pem_of_cert(c);
  out.record = AdminCertRecord{serial_hex(c), name, admin_role_name(role), issued_by, now,
                               now + static_cast<int64_t>(days) * 86400, 0};
  return out;
}

AdminPeer admin_peer_of(X509* cert) {
  return AdminPeer{serial_hex(cert), subject_entry(cert, NID_commonName),
                   subject_entry(cert, NID_organizationalUnitName)};
}

Result<AdminIdentity> authenticate_admin(Store& store, const AdminPeer& peer, int64_t now) {
  auto record = store.get_admin_cert(peer.serial);
  if (!record.is_ok()) {
    if (record.status().kind() == ErrorKind::kNotFound) {
      return Status::error(ErrorKind::kRefused,
                           str_cat("admin certificate ", peer.serial, " was not issued by this key server's records"));
    }
    return record.status();
  }
  if (record->revoked_at != 0) {
    return Status::error(ErrorKind::kRefused, str_cat("admin certificate ", peer.serial, " of ",
                                                      record->name, " is revoked"));
  }
  if (record->expires_at < now) {
    return Status::error(ErrorKind::kRefused, str_cat("admin certificate ", peer.serial, " has expired"));
  }
  auto role = parse_admin_role(record->role);
  if (!role || record->name != peer.name || record->role != peer.role) {
    return Status::error(ErrorKind::kRefused,
                         str_cat("admin certificate ", peer.serial, " does not match its record"));
  }
  return AdminIdentity{record->name, *role, record->serial};
}

}  // namespace keygate::server
