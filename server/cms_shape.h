// The exact shape of a provider's CMS SignedData, checked before OpenSSL
// verifies it. A CMS signature covers the content and the signed attributes;
// OpenSSL ignores much of the rest (versions, the content-type OID, NULL
// algorithm parameters, how the content is chunked), so a verifier that only
// calls CMS_verify accepts altered bytes there. Each provider's format is
// fixed, so anything outside its exact shape is refused: no altered byte of a
// real document verifies.
#pragma once

#include <string>
#include <vector>

#include "core/encoding.h"
#include "core/status.h"

namespace keygate::server {

using Oid = std::vector<uint8_t>;  // DER content octets of an OBJECT IDENTIFIER

extern const Oid kOidSha256;
extern const Oid kOidRsaEncryption;
extern const Oid kOidSha256WithRsa;

struct CmsShape {
  std::string what;                 // names the evidence in errors ("AWS signature")
  bool signed_attributes = false;   // SignerInfo carries [0] signed attributes
  bool certificates = false;        // SignedData carries [0] certificates (1 to 4)
  std::vector<Oid> digest_algorithms;     // accepted digest AlgorithmIdentifier OIDs
  std::vector<Oid> signature_algorithms;  // accepted signature AlgorithmIdentifier OIDs
};

// SignedData { 1, {digest}, { id-data, [0] OCTETs }, [[0] certs,] { SignerInfo {
//   1, issuerAndSerialNumber, digest, [[0] attrs,] signatureAlgorithm, OCTETs } } }
// inside ContentInfo { id-signedData, [0] ... }. BER with definite or
// indefinite lengths, depth- and size-bounded. Malformed encoding is
// kInvalidArgument; a well-formed but different shape is kIntegrity.
Status check_cms_shape(const Bytes& der, const CmsShape& shape);

}  // namespace keygate::server
