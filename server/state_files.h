// Files the server keeps in its state folder, created on first start:
//   kek         32-byte key-encryption key (0600)
//   ca.pem      the CA clients pin (public)      ca.key      its key (0600)
//   server.pem  the TLS certificate (public)     server.key  its key (0600)
#pragma once

#include <string>
#include <vector>

#include "core/file.h"
#include "core/secret.h"
#include "core/status.h"

namespace keygate::server {

// Reads the KEK at `path`, or creates one from the CSPRNG if the file does not
// exist. Refuses a KEK file readable by group or others, or of the wrong size.
Result<SecretBuffer> load_or_create_kek(const std::string& path);

// Creates `path` (0600) holding `content`, only once it is whole: written
// and synced in a file with no name, then linked in, which fails with
// kConflict if the file exists (another process made it first). A crash at
// any step leaves no file or the whole one.
Status create_secret_file_exclusively(const std::string& path, const SecretBuffer& content);

// Generates the CA and a server certificate for `subject_alt_names`
// ("DNS:name" or "IP:addr") unless all four files already exist.
Status ensure_tls_material(const std::string& dir, const std::vector<std::string>& subject_alt_names);

}  // namespace keygate::server
