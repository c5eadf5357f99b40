// libFuzzer target: PKCS#7/CMS from the network. The same bytes go to the
// AWS identity-signature verifier and the Azure attested-document verifier
// (each with the real trust fixtures and a clock inside the real samples'
// validity, so the real documents verify and the fuzzer starts from a
// passing shape), and, as text, to the AWS document parser and Azure's
// timestamp parser. Anything verified must be one of the real
// documents (their account, their platform).
#include <cstdint>

#include "server/aws_identity.h"
#include "server/azure_identity.h"
#include "tests/fuzz/fuzz_fixtures.h"

using namespace keygate;
using namespace keygate::server;

namespace {

AwsTrustStore* g_aws = nullptr;
AzureTrustStore* g_azure = nullptr;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_aws = new AwsTrustStore;
  if (!g_aws->add_pem("ap-southeast-2", fuzz::fixture("aws/cert-rsa2048-ap-southeast-2.pem")).is_ok()) {
    abort();
  }
  g_azure = new AzureTrustStore;
  for (const char* f : {"root-baltimore-cybertrust.pem", "root-digicert-global-root-g2.pem",
                        "intermediate-microsoft-rsa-tls-ca-01.pem",
                        "intermediate-microsoft-azure-tls-issuing-ca-05.pem"}) {
    if (!g_azure->add_pem(fuzz::fixture(std::string("azure/") + f), f).is_ok()) abort();
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 64 * 1024) return 0;
  const Bytes der(data, data + size);
  const FixedClock aws_time(1771203600);
  auto aws = verify_aws_identity(der, *g_aws, aws_time);
  if (aws.is_ok() && aws->account_id != "189292791360") abort();
  const FixedClock azure_time(1650331641 + 60);  // the "regular" sample
  AzureDocumentCheck check;
  check.nonce = "20220419-072721";
  auto azure = verify_azure_attested_document(der, *g_azure, azure_time, check);
  if (azure.is_ok() && azure->platform != "azure") abort();
  const std::string_view text = fuzz::text_of(data, size);
  (void)parse_aws_identity_document(text);
  (void)parse_azure_timestamp(text);
  (void)is_azure_metadata_name(text);
  return 0;
}
