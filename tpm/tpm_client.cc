#include "tpm/tpm_client.h"

#include <sys/stat.h>
#include <tss2/tss2_esys.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_rc.h>
#include <tss2/tss2_tcti_device.h>
#include <tss2/tss2_tcti_swtpm.h>

#include <cstdlib>
#include <cstring>

#include "tpm/tpm2_format.h"

namespace keygate::tpm {
namespace {

Status tss_error(const char* what, TSS2_RC rc, ErrorKind kind = ErrorKind::kUnavailable) {
  return Status::error(kind, str_cat("TPM ", what, ": ", Tss2_RC_Decode(rc)));
}

template <typename T>
struct EsysFree {
  void operator()(T* p) const { Esys_Free(p); }
};
template <typename T>
using EsysPtr = std::unique_ptr<T, EsysFree<T>>;

Result<TPML_PCR_SELECTION> selection(uint16_t bank, const std::vector<uint32_t>& pcrs) {
  if (hash_size(bank) == 0 || pcrs.empty()) {
    return Status::error(ErrorKind::kInvalidArgument, "TPM: bad PCR bank or empty selection");
  }
  TPML_PCR_SELECTION sel{};
  sel.count = 1;
  sel.pcrSelections[0].hash = bank;
  sel.pcrSelections[0].sizeofSelect = 3;
  for (uint32_t pcr : pcrs) {
    if (pcr > kMaxPcrIndex) return Status::error(ErrorKind::kInvalidArgument, "TPM: PCR index over 23");
    sel.pcrSelections[0].pcrSelect[pcr / 8] |= static_cast<uint8_t>(1u << (pcr % 8));
  }
  return sel;
}

template <typename T, typename F>
Bytes marshal(const T& value, F fn) {
  uint8_t buf[4096];
  size_t off = 0;
  if (fn(&value, buf, sizeof(buf), &off) != TSS2_RC_SUCCESS) return {};
  return Bytes(buf, buf + off);
}

// The storage primary seals are made under: ECC P-256, AES-128-CFB,
// from a fixed template (the same key whenever it is made).
TPM2B_PUBLIC storage_template() {
  TPM2B_PUBLIC t{};
  t.publicArea.type = TPM2_ALG_ECC;
  t.publicArea.nameAlg = TPM2_ALG_SHA256;
  t.publicArea.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                                  TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH |
                                  TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT | TPMA_OBJECT_NODA;
  t.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_AES;
  t.publicArea.parameters.eccDetail.symmetric.keyBits.aes = 128;
  t.publicArea.parameters.eccDetail.symmetric.mode.aes = TPM2_ALG_CFB;
  t.publicArea.parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL;
  t.publicArea.parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
  t.publicArea.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
  return t;
}

// The attestation key: restricted ECDSA P-256 / SHA-256 signing key.
TPM2B_PUBLIC attestation_template() {
  TPM2B_PUBLIC t{};
  t.publicArea.type = TPM2_ALG_ECC;
  t.publicArea.nameAlg = TPM2_ALG_SHA256;
  t.publicArea.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                                  TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH |
                                  TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_SIGN_ENCRYPT;
  t.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_NULL;
  t.publicArea.parameters.eccDetail.scheme.scheme = TPM2_ALG_ECDSA;
  t.publicArea.parameters.eccDetail.scheme.details.ecdsa.hashAlg = TPM2_ALG_SHA256;
  t.publicArea.parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
  t.publicArea.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
  return t;
}

}  // namespace

// Flushes a transient object or session when it goes out of scope.
struct FlushOnExit {
  ESYS_CONTEXT* esys;
  ESYS_TR handle = ESYS_TR_NONE;
  ~FlushOnExit() {
    if (handle != ESYS_TR_NONE) Esys_FlushContext(esys, handle);
  }
};

struct Tpm::Impl {
  TSS2_TCTI_CONTEXT* tcti = nullptr;
  ESYS_CONTEXT* esys = nullptr;
  ESYS_TR ak = ESYS_TR_NONE;
  bool ak_transient = false;
  Bytes ak_public;

  ~Impl() {
    if (esys != nullptr) {
      if (ak != ESYS_TR_NONE && ak_transient) Esys_FlushContext(esys, ak);
      Esys_Finalize(&esys);
    }
    if (tcti != nullptr) {
      Tss2_Tcti_Finalize(tcti);
      free(tcti);
    }
  }

  Result<ESYS_TR> create_primary(ESYS_TR hierarchy, const TPM2B_PUBLIC& tmpl, TPM2B_PUBLIC** out) {
    TPM2B_SENSITIVE_CREATE sensitive{};
    TPM2B_DATA outside{};
    TPML_PCR_SELECTION creation_pcr{};
    ESYS_TR handle = ESYS_TR_NONE;
    TPM2B_CREATION_DATA* creation_data = nullptr;
    TPM2B_DIGEST* creation_hash = nullptr;
    TPMT_TK_CREATION* ticket = nullptr;
    TSS2_RC rc = Esys_CreatePrimary(esys, hierarchy, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                                    &sensitive, &tmpl, &outside, &creation_pcr, &handle, out,
                                    &creation_data, &creation_hash, &ticket);
    Esys_Free(creation_data);
    Esys_Free(creation_hash);
    Esys_Free(ticket);
    if (rc != TSS2_RC_SUCCESS) return tss_error("create primary key", rc);
    return handle;
  }

  // The storage primary seals are made under (the same key every time).
  Result<ESYS_TR> storage_key() {
    TPM2B_PUBLIC* out = nullptr;
    auto srk = create_primary(ESYS_TR_RH_OWNER, storage_template(), &out);
    Esys_Free(out);
    if (!srk.is_ok()) return srk.status().with_context("storage key");
    return srk;
  }

  // A policy session (or a trial one) with PolicyPCR over `sel` at the
  // current values. Salted by `salt_key` for parameter encryption.
  Result<ESYS_TR> pcr_session(TPM2_SE type, const TPML_PCR_SELECTION& sel, ESYS_TR salt_key) {
    TPMT_SYM_DEF sym{};
    sym.algorithm = TPM2_ALG_AES;
    sym.keyBits.aes = 128;
    sym.mode.aes = TPM2_ALG_CFB;
    ESYS_TR session = ESYS_TR_NONE;
    TSS2_RC rc = Esys_StartAuthSession(esys, salt_key, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                       ESYS_TR_NONE, nullptr, type, &sym, TPM2_ALG_SHA256, &session);
    if (rc != TSS2_RC_SUCCESS) return tss_error("start policy session", rc);
    TPM2B_DIGEST empty{};
    rc = Esys_PolicyPCR(esys, session, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &empty, &sel);
    if (rc != TSS2_RC_SUCCESS) {
      Esys_FlushContext(esys, session);
      return tss_error("PCR policy", rc);
    }
    return session;
  }
};

Tpm::Tpm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tpm::~Tpm() = default;

Result<std::unique_ptr<Tpm>> Tpm::open(const std::string& tcti) {
  auto impl = std::make_unique<Impl>();
  size_t size = 0;
  TSS2_RC rc;
  auto colon = tcti.find(':');
  const std::string kind = tcti.substr(0, colon);
  const std::string conf = colon == std::string::npos ? "" : tcti.substr(colon + 1);
  if (kind == "device") {
    const std::string path = conf.empty() ? "/dev/tpmrm0" : conf;
    struct stat st{};
    if (stat(path.c_str(), &st) != 0) {
      return Status::error(ErrorKind::kNotFound, str_cat("no TPM: ", path, " does not exist"));
    }
    rc = Tss2_Tcti_Device_Init(nullptr, &size, path.c_str());
    if (rc == TSS2_RC_SUCCESS) {
      impl->tcti = static_cast<TSS2_TCTI_CONTEXT*>(calloc(1, size));
      rc = Tss2_Tcti_Device_Init(impl->tcti, &size, path.c_str());
    }
  } else if (kind == "swtpm") {
    rc = Tss2_Tcti_Swtpm_Init(nullptr, &size, conf.c_str());
    if (rc == TSS2_RC_SUCCESS) {
      impl->tcti = static_cast<TSS2_TCTI_CONTEXT*>(calloc(1, size));
      rc = Tss2_Tcti_Swtpm_Init(impl->tcti, &size, conf.c_str());
    }
  } else {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("TPM interface '", tcti, "': use device:PATH or swtpm:host=H,port=P"));
  }
  if (rc != TSS2_RC_SUCCESS) {
    free(impl->tcti);
    impl->tcti = nullptr;
    return tss_error(str_cat("interface ", tcti).c_str(), rc);
  }
  rc = Esys_Initialize(&impl->esys, impl->tcti, nullptr);
  if (rc != TSS2_RC_SUCCESS) return tss_error("initialize", rc);
  return std::unique_ptr<Tpm>(new Tpm(std::move(impl)));
}

Result<Bytes> Tpm::attestation_key(uint32_t persistent_handle) {
  if (!impl_->ak_public.empty()) return impl_->ak_public;
  TPM2B_PUBLIC* out = nullptr;
  if (persistent_handle != 0) {
    if ((persistent_handle >> 24) != 0x81) {
      return Status::error(ErrorKind::kInvalidArgument, "TPM: attestation key handle must be 0x81xxxxxx");
    }
    TSS2_RC rc = Esys_TR_FromTPMPublic(impl_->esys, persistent_handle, ESYS_TR_NONE, ESYS_TR_NONE,
                                       ESYS_TR_NONE, &impl_->ak);
    if (rc != TSS2_RC_SUCCESS) return tss_error("load persistent attestation key", rc, ErrorKind::kNotFound);
    rc = Esys_ReadPublic(impl_->esys, impl_->ak, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &out,
                         nullptr, nullptr);
    if (rc != TSS2_RC_SUCCESS) return tss_error("read attestation key", rc);
  } else {
    auto handle = impl_->create_primary(ESYS_TR_RH_ENDORSEMENT, attestation_template(), &out);
    if (!handle.is_ok()) return handle.status().with_context("attestation key");
    impl_->ak = handle.value();
    impl_->ak_transient = true;
  }
  EsysPtr<TPM2B_PUBLIC> pub(out);
  impl_->ak_public = marshal(pub->publicArea, Tss2_MU_TPMT_PUBLIC_Marshal);
  auto parsed = parse_public(impl_->ak_public);
  if (!parsed.is_ok() || !parsed->restricted_signing()) {
    return Status::error(ErrorKind::kInvalidArgument,
                         "TPM: the attestation key is not a restricted signing key");
  }
  return impl_->ak_public;
}

Result<std::map<uint32_t, Bytes>> Tpm::read_pcrs(uint16_t bank, const std::vector<uint32_t>& pcrs) {
  std::map<uint32_t, Bytes> out;
  std::vector<uint32_t> left = pcrs;
  // One command reads them all unless more than eight are asked: PCR_Read
  // answers at most eight digests and says which (ascending order).
  while (!left.empty()) {
    auto sel = selection(bank, left);
    if (!sel.is_ok()) return sel.status();
    UINT32 counter = 0;
    TPML_PCR_SELECTION* sel_out = nullptr;
    TPML_DIGEST* values = nullptr;
    TSS2_RC rc = Esys_PCR_Read(impl_->esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &sel.value(),
                               &counter, &sel_out, &values);
    EsysPtr<TPML_PCR_SELECTION> s(sel_out);
    EsysPtr<TPML_DIGEST> v(values);
    if (rc != TSS2_RC_SUCCESS) return tss_error("PCR read", rc);
    std::vector<uint32_t> read;
    for (uint32_t pcr : left) {
      const TPMS_PCR_SELECTION& got = s->pcrSelections[0];
      if (s->count == 1 && got.hash == bank && pcr / 8 < got.sizeofSelect &&
          (got.pcrSelect[pcr / 8] & (1u << (pcr % 8)))) {
        read.push_back(pcr);
      }
    }
    if (read.empty() || read.size() != v->count) {
      return Status::error(ErrorKind::kNotFound,
                           str_cat("TPM: PCR ", left.front(), " of the ", hash_alg_name(bank),
                                   " bank is not allocated"));
    }
    for (size_t i = 0; i < read.size(); ++i) {
      if (v->digests[i].size != hash_size(bank)) {
        return Status::error(ErrorKind::kInvalidArgument, "TPM: PCR value of the wrong size");
      }
      out[read[i]] = Bytes(v->digests[i].buffer, v->digests[i].buffer + v->digests[i].size);
    }
    std::vector<uint32_t> rest;
    for (uint32_t pcr : left) {
      if (!out.count(pcr)) rest.push_back(pcr);
    }
    left = std::move(rest);
  }
  return out;
}

Result<Quote> Tpm::quote(uint16_t bank, const std::vector<uint32_t>& pcrs,
                         const Bytes& qualifying_data) {
  if (impl_->ak == ESYS_TR_NONE) {
    auto ak = attestation_key();
    if (!ak.is_ok()) return ak.status();
  }
  auto sel = selection(bank, pcrs);
  if (!sel.is_ok()) return sel.status();
  if (qualifying_data.size() > sizeof(TPMU_HA)) {
    return Status::error(ErrorKind::kInvalidArgument, "TPM: qualifying data too long");
  }
  auto ak = parse_public(impl_->ak_public);
  if (!ak.is_ok()) return ak.status();
  // PCRs can move between the read and the quote (a service extending them
  // at boot); read, quote, and try again if the digest disagrees.
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto values = read_pcrs(bank, pcrs);
    if (!values.is_ok()) return values.status();
    TPM2B_DATA qd{};
    qd.size = static_cast<UINT16>(qualifying_data.size());
    if (!qualifying_data.empty()) memcpy(qd.buffer, qualifying_data.data(), qualifying_data.size());
    TPMT_SIG_SCHEME scheme{};
    scheme.scheme = TPM2_ALG_NULL;  // the key's own scheme
    TPM2B_ATTEST* quoted = nullptr;
    TPMT_SIGNATURE* signature = nullptr;
    TSS2_RC rc = Esys_Quote(impl_->esys, impl_->ak, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                            &qd, &scheme, &sel.value(), &quoted, &signature);
    EsysPtr<TPM2B_ATTEST> q(quoted);
    EsysPtr<TPMT_SIGNATURE> s(signature);
    if (rc != TSS2_RC_SUCCESS) return tss_error("quote", rc);
    Quote out;
    out.attest = Bytes(q->attestationData, q->attestationData + q->size);
    out.signature = marshal(*s, Tss2_MU_TPMT_SIGNATURE_Marshal);
    out.pcr_values = std::move(values).value();
    QuoteCheck check;
    check.qualifying_data = qualifying_data;
    check.selection = PcrSelection{bank, pcrs};
    check.pcr_values = out.pcr_values;
    auto verified = verify_quote(out.attest, out.signature, ak.value(), check);
    if (verified.is_ok()) return out;
    if (verified.status().message().find("do not match the quoted digest") == std::string::npos) {
      return verified.status().with_context("TPM: own quote does not verify");
    }
  }
  return Status::error(ErrorKind::kUnavailable, "TPM: PCRs kept changing during the quote");
}

Result<Bytes> Tpm::seal(const SecretBuffer& data, uint16_t bank, const std::vector<uint32_t>& pcrs) {
  if (data.size() == 0 || data.size() > 128) {
    return Status::error(ErrorKind::kInvalidArgument, "TPM: sealed data must be 1 to 128 bytes");
  }
  auto sel = selection(bank, pcrs);
  if (!sel.is_ok()) return sel.status();
  auto srk = impl_->storage_key();
  if (!srk.is_ok()) return srk.status();
  FlushOnExit flush_srk{impl_->esys, srk.value()};
  auto trial = impl_->pcr_session(TPM2_SE_TRIAL, sel.value(), ESYS_TR_NONE);
  if (!trial.is_ok()) return trial.status();
  TPM2B_DIGEST* policy = nullptr;
  TSS2_RC rc = Esys_PolicyGetDigest(impl_->esys, trial.value(), ESYS_TR_NONE, ESYS_TR_NONE,
                                    ESYS_TR_NONE, &policy);
  Esys_FlushContext(impl_->esys, trial.value());
  EsysPtr<TPM2B_DIGEST> policy_digest(policy);
  if (rc != TSS2_RC_SUCCESS) return tss_error("policy digest", rc);

  TPM2B_SENSITIVE_CREATE sensitive{};
  sensitive.sensitive.data.size = static_cast<UINT16>(data.size());
  memcpy(sensitive.sensitive.data.buffer, data.data(), data.size());
  TPM2B_PUBLIC tmpl{};
  tmpl.publicArea.type = TPM2_ALG_KEYEDHASH;
  tmpl.publicArea.nameAlg = TPM2_ALG_SHA256;
  // No userWithAuth: only the PCR policy authorises unsealing.
  tmpl.publicArea.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT;
  tmpl.publicArea.authPolicy = *policy_digest;
  tmpl.publicArea.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG_NULL;
  TPM2B_DATA outside{};
  TPML_PCR_SELECTION creation_pcr{};
  TPM2B_PRIVATE* out_private = nullptr;
  TPM2B_PUBLIC* out_public = nullptr;
  TPM2B_CREATION_DATA* creation_data = nullptr;
  TPM2B_DIGEST* creation_hash = nullptr;
  TPMT_TK_CREATION* ticket = nullptr;
  rc = Esys_Create(impl_->esys, srk.value(), ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                   &sensitive, &tmpl, &outside, &creation_pcr, &out_private, &out_public,
                   &creation_data, &creation_hash, &ticket);
  explicit_bzero(&sensitive, sizeof(sensitive));
  EsysPtr<TPM2B_PRIVATE> priv(out_private);
  EsysPtr<TPM2B_PUBLIC> pub(out_public);
  Esys_Free(creation_data);
  Esys_Free(creation_hash);
  Esys_Free(ticket);
  if (rc != TSS2_RC_SUCCESS) return tss_error("seal", rc);
  Bytes blob = marshal(*pub, Tss2_MU_TPM2B_PUBLIC_Marshal);
  Bytes p = marshal(*priv, Tss2_MU_TPM2B_PRIVATE_Marshal);
  if (blob.empty() || p.empty()) return Status::error(ErrorKind::kInternal, "TPM: cannot encode sealed object");
  blob.insert(blob.end(), p.begin(), p.end());
  return blob;
}

Result<SecretBuffer> Tpm::unseal(const Bytes& blob, uint16_t bank, const std::vector<uint32_t>& pcrs) {
  auto sel = selection(bank, pcrs);
  if (!sel.is_ok()) return sel.status();
  TPM2B_PUBLIC pub{};
  TPM2B_PRIVATE priv{};
  size_t off = 0;
  if (Tss2_MU_TPM2B_PUBLIC_Unmarshal(blob.data(), blob.size(), &off, &pub) != TSS2_RC_SUCCESS ||
      Tss2_MU_TPM2B_PRIVATE_Unmarshal(blob.data(), blob.size(), &off, &priv) != TSS2_RC_SUCCESS ||
      off != blob.size()) {
    return Status::error(ErrorKind::kInvalidArgument, "TPM: sealed object is malformed");
  }
  auto srk = impl_->storage_key();
  if (!srk.is_ok()) return srk.status();
  FlushOnExit flush_srk{impl_->esys, srk.value()}, flush_obj{impl_->esys},
      flush_session{impl_->esys};
  TSS2_RC rc = Esys_Load(impl_->esys, srk.value(), ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                         &priv, &pub, &flush_obj.handle);
  if (rc != TSS2_RC_SUCCESS) {
    return tss_error("load sealed object (made by another TPM?)", rc, ErrorKind::kRefused);
  }
  // Salted with the storage key, so the unsealed value crosses the bus
  // encrypted.
  auto session = impl_->pcr_session(TPM2_SE_POLICY, sel.value(), srk.value());
  if (!session.is_ok()) return session.status();
  flush_session.handle = session.value();
  Esys_TRSess_SetAttributes(impl_->esys, session.value(), TPMA_SESSION_ENCRYPT,
                            TPMA_SESSION_ENCRYPT | TPMA_SESSION_DECRYPT);
  TPM2B_SENSITIVE_DATA* out = nullptr;
  rc = Esys_Unseal(impl_->esys, flush_obj.handle, session.value(), ESYS_TR_NONE, ESYS_TR_NONE, &out);
  if (rc != TSS2_RC_SUCCESS) {
    return tss_error("unseal (PCR values changed since sealing?)", rc, ErrorKind::kRefused);
  }
  auto secret = SecretBuffer::allocate(out->size);
  if (secret.is_ok()) memcpy(secret->data(), out->buffer, out->size);
  explicit_bzero(out, sizeof(*out));
  Esys_Free(out);
  return secret;
}

}  // namespace keygate::tpm
