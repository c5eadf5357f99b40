// The production quote verifier against real GCE vTPM quotes (RSA
// attestation key, three PCR banks, with and without a nonce).
#include <gtest/gtest.h>
#include <openssl/pem.h>

#include "core/encoding.h"
#include "core/json.h"
#include "tests/test_files.h"
#include "tpm/tpm2_format.h"

namespace keygate::tpm {
namespace {

using test_files::read_file;

const std::string kTpm = test_files::kRealFixtures + "tpm/";

struct Recorded {
  std::string attestation;  // nonce9009 | nononce
  std::string bank;         // sha1 | sha256 | sha384
};

std::vector<Recorded> all_quotes() {
  std::vector<Recorded> out;
  for (const char* a : {"nonce9009", "nononce"}) {
    for (const char* b : {"sha1", "sha256", "sha384"}) out.push_back({a, b});
  }
  return out;
}

Bytes file_bytes(const std::string& name) { return to_bytes(read_file(kTpm + name)); }

PublicKey gce_ak() {
  auto ak = parse_public(file_bytes("gce-cos85.ak.tpmt_public.bin"));
  EXPECT_TRUE(ak.is_ok()) << ak.status().message();
  return ak.is_ok() ? std::move(ak).value() : PublicKey{};
}

QuoteCheck check_for(const Recorded& q) {
  QuoteCheck c;
  c.qualifying_data = q.attestation == "nonce9009" ? file_bytes("gce-cos85-nonce9009.nonce.bin") : Bytes{};
  c.selection.hash_alg = hash_alg_from_name(q.bank);
  for (uint32_t i = 0; i <= 23; ++i) c.selection.pcrs.push_back(i);
  auto json = parse_json_object(read_file(kTpm + "gce-cos85-" + q.attestation + ".quote-" + q.bank + ".pcrs.json"));
  EXPECT_TRUE(json.is_ok());
  for (const auto& key : json.value()["pcrs"].getMemberNames()) {
    c.pcr_values[static_cast<uint32_t>(std::stoul(key))] =
        hex_decode(json.value()["pcrs"][key].asString()).value();
  }
  return c;
}

Bytes attest_of(const Recorded& q) {
  return file_bytes("gce-cos85-" + q.attestation + ".quote-" + q.bank + ".attest.bin");
}
Bytes signature_of(const Recorded& q) {
  return file_bytes("gce-cos85-" + q.attestation + ".quote-" + q.bank + ".sig.tpmt_signature.bin");
}

TEST(TpmQuote, GceAttestationKeyParses) {
  PublicKey ak = gce_ak();
  EXPECT_EQ(ak.type, kAlgRsa);
  EXPECT_TRUE(ak.restricted_signing());
  EXPECT_EQ(hex_encode(ak.name),
            "000bf175bdb57297b2b289973f819863d6c9d09c236725676914f4248c9a2404c2a4");
  // The same key as the recorded PEM.
  std::string pem = read_file(kTpm + "gce-cos85.ak.pub.pem");
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), BIO_free);
  PkeyPtr expected(PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr));
  ASSERT_TRUE(expected);
  EXPECT_EQ(EVP_PKEY_eq(ak.key.get(), expected.get()), 1);
}

TEST(TpmQuote, RealGceQuotesVerify) {
  PublicKey ak = gce_ak();
  for (const Recorded& q : all_quotes()) {
    auto attest = verify_quote(attest_of(q), signature_of(q), ak, check_for(q));
    ASSERT_TRUE(attest.is_ok()) << q.attestation << "/" << q.bank << ": " << attest.status().message();
    EXPECT_EQ(attest->selections[0].pcrs.size(), 24u);
  }
}

TEST(TpmQuote, EveryAlteredByteOfAttestSignatureOrPcrValueIsRefused) {
  PublicKey ak = gce_ak();
  size_t accepted = 0;
  for (const Recorded& q : all_quotes()) {
    const Bytes attest = attest_of(q), sig = signature_of(q);
    const QuoteCheck check = check_for(q);
    for (uint8_t flip : {0x01, 0x80}) {
      for (size_t i = 0; i < attest.size(); ++i) {
        Bytes a = attest;
        a[i] ^= flip;
        if (verify_quote(a, sig, ak, check).is_ok()) {
          ++accepted;
          ADD_FAILURE() << q.attestation << "/" << q.bank << " attest byte " << i;
        }
      }
      for (size_t i = 0; i < sig.size(); ++i) {
        Bytes s = sig;
        s[i] ^= flip;
        if (verify_quote(attest, s, ak, check).is_ok()) {
          ++accepted;
          ADD_FAILURE() << q.attestation << "/" << q.bank << " signature byte " << i;
        }
      }
      for (const auto& [pcr, value] : check.pcr_values) {
        for (size_t i = 0; i < value.size(); ++i) {
          QuoteCheck c = check;
          c.pcr_values[pcr][i] ^= flip;
          if (verify_quote(attest, sig, ak, c).is_ok()) {
            ++accepted;
            ADD_FAILURE() << q.attestation << "/" << q.bank << " PCR " << pcr << " byte " << i;
          }
        }
      }
    }
  }
  EXPECT_EQ(accepted, 0u);
}

TEST(TpmQuote, NonceSelectionAndKeyAreChecked) {
  PublicKey ak = gce_ak();
  Recorded q{"nonce9009", "sha256"};
  QuoteCheck other_nonce = check_for(q);
  other_nonce.qualifying_data = {0x90, 0x0a};
  auto r = verify_quote(attest_of(q), signature_of(q), ak, other_nonce);
  EXPECT_EQ(r.status().kind(), ErrorKind::kRefused);
  // A quote made without a nonce does not stand in for one with it.
  r = verify_quote(attest_of({"nononce", "sha256"}), signature_of({"nononce", "sha256"}), ak, check_for(q));
  EXPECT_FALSE(r.is_ok());
  // The policy selects fewer PCRs than the quote covers.
  QuoteCheck fewer = check_for(q);
  fewer.selection.pcrs = {0, 7};
  fewer.pcr_values = {{0, fewer.pcr_values[0]}, {7, fewer.pcr_values[7]}};
  EXPECT_FALSE(verify_quote(attest_of(q), signature_of(q), ak, fewer).is_ok());
  // Another bank's values.
  QuoteCheck bank = check_for({"nonce9009", "sha384"});
  EXPECT_FALSE(verify_quote(attest_of(q), signature_of(q), ak, bank).is_ok());
  // A missing or an extra value.
  QuoteCheck missing = check_for(q);
  missing.pcr_values.erase(23);
  EXPECT_FALSE(verify_quote(attest_of(q), signature_of(q), ak, missing).is_ok());
  // Another key (the quote's own attest bytes re-read as garbage keys fail to parse).
  EXPECT_FALSE(parse_public(attest_of(q)).is_ok());
}

TEST(TpmQuote, TruncatedAndGarbageInputIsRefused) {
  PublicKey ak = gce_ak();
  Recorded q{"nonce9009", "sha256"};
  const Bytes attest = attest_of(q), sig = signature_of(q);
  const QuoteCheck check = check_for(q);
  for (size_t len = 0; len < attest.size(); ++len) {
    EXPECT_FALSE(verify_quote(Bytes(attest.begin(), attest.begin() + static_cast<long>(len)), sig, ak, check).is_ok());
  }
  for (size_t len = 0; len < sig.size(); ++len) {
    EXPECT_FALSE(verify_quote(attest, Bytes(sig.begin(), sig.begin() + static_cast<long>(len)), ak, check).is_ok());
  }
  Bytes longer = attest;
  longer.push_back(0);
  EXPECT_FALSE(verify_quote(longer, sig, ak, check).is_ok());
  EXPECT_FALSE(verify_quote(Bytes(5000, 0xff), sig, ak, check).is_ok());
  const Bytes pub = file_bytes("gce-cos85.ak.tpmt_public.bin");
  for (size_t len = 0; len < pub.size(); ++len) {
    EXPECT_FALSE(parse_public(Bytes(pub.begin(), pub.begin() + static_cast<long>(len))).is_ok());
  }
}

}  // namespace
}  // namespace keygate::tpm
