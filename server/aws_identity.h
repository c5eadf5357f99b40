// Verification of AWS EC2 instance identity documents (the `rsa2048`
// flavour: a CMS SignedData, RSA-2048 + SHA-256, document embedded).
//
// AWS signs each region's documents with that region's own self-signed
// certificate, so the trust store is keyed by region: a document claiming
// region R verifies only against R's certificates.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/clock.h"
#include "core/encoding.h"
#include "core/status.h"
#include "server/policy.h"

namespace keygate::server {

struct AwsIdentity {
  std::string account_id;
  std::string region;
  std::string availability_zone;
  std::string image_id;
  std::string instance_id;
  std::string instance_type;
  std::string architecture;
  std::string pending_time;
};

class AwsTrustStore {
 public:
  AwsTrustStore();
  ~AwsTrustStore();
  AwsTrustStore(AwsTrustStore&&) noexcept;
  AwsTrustStore& operator=(AwsTrustStore&&) noexcept;

  // Loads every "<region>.pem" in `dir` (one or more certificates each).
  // Fails if the folder cannot be read or a file is not PEM.
  Status add_directory(const std::string& dir);
  // Adds the certificates in `pem` for `region`.
  Status add_pem(const std::string& region, std::string_view pem);

  size_t region_count() const;
  size_t certificate_count() const;

  struct Impl;
  const Impl& impl() const { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

// Verifies the CMS signature over the embedded document with the region's
// certificates (validity checked at `clock`'s time) and returns the
// document's fields. Any altered byte, unknown region, wrong signer or
// malformed input fails with kIntegrity or kInvalidArgument.
Result<AwsIdentity> verify_aws_identity(const Bytes& pkcs7_der, const AwsTrustStore& trust,
                                        const Clock& clock);

// The platform-neutral form the policy evaluates (platform "aws").
Identity to_identity(const AwsIdentity& id);

// Parses a document's JSON (already authenticated) into fields.
Result<AwsIdentity> parse_aws_identity_document(std::string_view document);

}  // namespace keygate::server
