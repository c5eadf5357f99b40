// Verification of Azure IMDS attested documents
// (/metadata/attested/document): a CMS SignedData, RSA + SHA-256, embedding
// the JSON document and only the signer's certificate. The signer chains
// through Microsoft's intermediates (supplied by the operator: Azure does
// not send them) to a configured root, and its name must be Azure's
// metadata service. The document's nonce carries the unlock's binding.
#pragma once

#include <memory>
#include <string>

#include "core/clock.h"
#include "core/encoding.h"
#include "core/status.h"
#include "server/policy.h"

namespace keygate::server {

class AzureTrustStore {
 public:
  AzureTrustStore();
  ~AzureTrustStore();
  AzureTrustStore(AzureTrustStore&&) noexcept;
  AzureTrustStore& operator=(AzureTrustStore&&) noexcept;

  // Self-signed certificates become roots, the others intermediates.
  Status add_pem(std::string_view pem, const std::string& origin);
  // Every *.pem (or *.crt) file in `dir`.
  Status add_directory(const std::string& dir);
  size_t root_count() const;
  size_t intermediate_count() const;

  struct Impl;
  const Impl& impl() const { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

struct AzureDocumentCheck {
  std::string nonce;              // must equal the document's nonce exactly
  int64_t max_age_seconds = 300;  // createdOn no older than this
  int64_t skew_seconds = 60;      // allowed clock difference
};

// Verifies the exact CMS shape, the signature, the signer's chain at
// `clock`'s time, the signer's name, the nonce and the validity window, and
// returns the document's claims as an Identity (platform "azure").
// Malformed input is kInvalidArgument, anything that does not verify
// kIntegrity, a stale document or another nonce kRefused.
Result<Identity> verify_azure_attested_document(const Bytes& pkcs7_der,
                                                const AzureTrustStore& trust, const Clock& clock,
                                                const AzureDocumentCheck& check);

// "MM/DD/YY hh:mm:ss -0000" (Azure's timeStamp format) to Unix seconds.
Result<int64_t> parse_azure_timestamp(std::string_view text);

// True if `name` is Azure's metadata service:
// ^(.*\.)?metadata\.(azure\.(com|us|cn)|microsoftazure\.de)$
bool is_azure_metadata_name(std::string_view name);

}  // namespace keygate::server
