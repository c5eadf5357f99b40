#include "server/state_files.h"

#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "core/crypto.h"
#include "server/x509_util.h"

namespace keygate::server {
namespace {

constexpr size_t kKekSize = 32;

bool file_exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

// Writes all of `kek` to `fd` and syncs it.
bool write_and_sync(int fd, const SecretBuffer& kek) {
  size_t done = 0;
  while (done < kek.size()) {
    ssize_t n = write(fd, kek.data() + done, kek.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return fsync(fd) == 0;
}

}  // namespace

// Gives `path` the new KEK only once it is whole: written and synced in a
// file with no name (O_TMPFILE), then linked in, which fails if another
// start made one first. A crash at any step leaves no file or the whole
// one, never an empty or short one. Where O_TMPFILE or /proc is missing, a
// named temporary file does the same, linked and then removed.
Status create_secret_file_exclusively(const std::string& path, const SecretBuffer& kek) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash);
  int fd = open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
  if (fd >= 0) {
    const std::string proc = str_cat("/proc/self/fd/", fd);
    const bool written = write_and_sync(fd, kek);
    const bool linked = written && linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, path.c_str(),
                                          AT_SYMLINK_FOLLOW) == 0;
    const int err = errno;
    close(fd);
    if (linked) return sync_parent_dir(path);
    if (!written || err == EEXIST) {
      return Status::error(err == EEXIST ? ErrorKind::kConflict : ErrorKind::kIo,
                           str_cat("write ", path, ": ", strerror(err)));
    }
    // linkat through /proc failed for want of /proc: the named way below.
  }
  const std::string tmp = str_cat(path, ".new-", hex_encode(random_bytes(6)));
  fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return Status::error(ErrorKind::kIo, str_cat("create ", tmp, ": ", strerror(errno)));
  const bool written = write_and_sync(fd, kek);
  close(fd);
  const bool linked = written && link(tmp.c_str(), path.c_str()) == 0;
  const int err = errno;
  unlink(tmp.c_str());
  if (!linked) {
    return Status::error(err == EEXIST ? ErrorKind::kConflict : ErrorKind::kIo,
                         str_cat("write ", path, ": ", strerror(err)));
  }
  return sync_parent_dir(path);
}

Result<SecretBuffer> load_or_create_kek(const std::string& path) {
  if (!file_exists(path)) {
    auto kek = SecretBuffer::random(kKekSize);
    if (!kek.is_ok()) return kek.status();
    Status created = create_secret_file_exclusively(path, kek.value());
    if (created.is_ok()) return kek;
    // Another start made it first: use that one.
    if (created.kind() != ErrorKind::kConflict) return created;
  }
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    return Status::error(ErrorKind::kIo, str_cat("stat KEK ", path, ": ", strerror(errno)));
  }
  if ((st.st_mode & 077) != 0) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("KEK ", path, " is readable by group or others; chmod 600 it"));
  }
  if (st.st_size == 0) {
    // Only an older keygate-server, stopped while writing its first KEK,
    // left one empty; no secret was sealed under it.
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("KEK ", path, " is empty (a first start of an older keygate-server "
                                 "was stopped while writing it); if 'keygate-server volumes list' "
                                 "shows no volume, delete it and start again"));
  }
  auto kek = read_secret_file(path, kKekSize, false);
  if (!kek.is_ok()) return kek.status().with_context("KEK");
  if (kek->size() != kKekSize) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("KEK ", path, " must be exactly 32 bytes"));
  }
  return kek;
}

Status ensure_tls_material(const std::string& dir,
                           const std::vector<std::string>& subject_alt_names) {
  const std::string ca_pem = dir + "/ca.pem", ca_key = dir + "/ca.key";
  const std::string srv_pem = dir + "/server.pem", srv_key = dir + "/server.key";
  if (file_exists(ca_pem) && file_exists(ca_key) && file_exists(srv_pem) &&
      file_exists(srv_key)) {
    return Status::ok();
  }
  auto ca_pkey = generate_p256();
  auto srv_pkey = generate_p256();
  if (!ca_pkey || !srv_pkey) return Status::error(ErrorKind::kInternal, "EC key generation");

  auto ca = make_cert(ca_pkey.get(), {{"O", "keygate"}, {"CN", "keygate CA " + hex_encode(random_bytes(4))}}, nullptr, 3650);
  if (!ca.is_ok()) return ca.status();
  X509* ca_cert = ca->get();
  KEYGATE_RETURN_IF_ERROR(add_ext(ca_cert, ca_cert, NID_basic_constraints, "critical,CA:TRUE,pathlen:0"));
  KEYGATE_RETURN_IF_ERROR(add_ext(ca_cert, ca_cert, NID_key_usage, "critical,keyCertSign,cRLSign"));
  KEYGATE_RETURN_IF_ERROR(add_ext(ca_cert, ca_cert, NID_subject_key_identifier, "hash"));
  if (X509_sign(ca_cert, ca_pkey.get(), EVP_sha256()) == 0) {
    return Status::error(ErrorKind::kInternal, "sign CA certificate");
  }

  auto srv = make_cert(srv_pkey.get(), {{"O", "keygate"}, {"CN", "keygate-server"}}, ca_cert, 1825);
  if (!srv.is_ok()) return srv.status();
  X509* srv_cert = srv->get();
  std::string san;
  for (const auto& name : subject_alt_names) {
    if (!san.empty()) san += ",";
    san += name;
  }
  KEYGATE_RETURN_IF_ERROR(add_ext(srv_cert, ca_cert, NID_basic_constraints, "critical,CA:FALSE"));
  KEYGATE_RETURN_IF_ERROR(add_ext(srv_cert, ca_cert, NID_key_usage, "critical,digitalSignature"));
  KEYGATE_RETURN_IF_ERROR(add_ext(srv_cert, ca_cert, NID_ext_key_usage, "serverAuth"));
  KEYGATE_RETURN_IF_ERROR(add_ext(srv_cert, ca_cert, NID_authority_key_identifier, "keyid"));
  if (!san.empty()) KEYGATE_RETURN_IF_ERROR(add_ext(srv_cert, ca_cert, NID_subject_alt_name, san));
  if (X509_sign(srv_cert, ca_pkey.get(), EVP_sha256()) == 0) {
    return Status::error(ErrorKind::kInternal, "sign server certificate");
  }

  auto ca_key_pem = pem_of_key(ca_pkey.get());
  auto srv_key_pem = pem_of_key(srv_pkey.get());
  if (!ca_key_pem.is_ok()) return ca_key_pem.status();
  if (!srv_key_pem.is_ok()) return srv_key_pem.status();
  auto view = [](const SecretBuffer& b) {
    return std::string_view(reinterpret_cast<const char*>(b.data()), b.size());
  };
  KEYGATE_RETURN_IF_ERROR(write_file_atomically(ca_key, view(ca_key_pem.value()), 0600));
  KEYGATE_RETURN_IF_ERROR(write_file_atomically(srv_key, view(srv_key_pem.value()), 0600));
  KEYGATE_RETURN_IF_ERROR(write_file_atomically(ca_pem, pem_of_cert(ca_cert), 0644));
  KEYGATE_RETURN_IF_ERROR(write_file_atomically(srv_pem, pem_of_cert(srv_cert), 0644));
  return Status::ok();
}

}  // namespace keygate::server
