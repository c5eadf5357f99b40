// `keygate-server admin ...`: the admin API's client (server/admin_api.h),
// and `admin bootstrap`, the one admin command that reads the state folder
// (it issues the first admin certificate).
//
// A person's folder (--admin-dir, default $KEYGATE_ADMIN_DIR or
// ~/.keygate-admin) holds their key (key.pem, 0600), their certificate
// (cert.pem), the key server's CA to pin (server-ca.pem) and the server's
// URL (server; --server wins).
#pragma once

#include "core/args.h"
#include "server/policy.h"
#include "server/settings.h"

namespace keygate::server {

// Runs `admin SUB ...`; `tmpl` is the token template the command line
// describes (for `admin token create`), null when it did not parse.
int admin_command(const Args& args, const Settings& settings, const Result<EnrollmentTemplate>& tmpl);

}  // namespace keygate::server
