#include "core/pkey.h"

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/param_build.h>

#include "core/crypto.h"

namespace keygate {
namespace {

Result<PkeyPtr> from_params(const char* type, OSSL_PARAM_BLD* bld) {
  std::unique_ptr<OSSL_PARAM, decltype(&OSSL_PARAM_free)> params(OSSL_PARAM_BLD_to_param(bld),
                                                                 OSSL_PARAM_free);
  std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> ctx(
      EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr), EVP_PKEY_CTX_free);
  EVP_PKEY* key = nullptr;
  if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &key, EVP_PKEY_PUBLIC_KEY, params.get()) != 1) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("unusable ", type, " public key: ", openssl_last_error()));
  }
  return PkeyPtr(key);
}

}  // namespace

Result<PkeyPtr> rsa_public_key(const Bytes& n, const Bytes& e) {
  if (n.empty() || e.empty() || n[0] == 0 || e[0] == 0 || e.size() > 8) {
    return Status::error(ErrorKind::kInvalidArgument, "RSA key: malformed modulus or exponent");
  }
  if (n.size() < 256 || n.size() > 1024) {
    return Status::error(ErrorKind::kInvalidArgument, "RSA key: modulus must be 2048 to 8192 bits");
  }
  std::unique_ptr<BIGNUM, decltype(&BN_free)> bn_n(
      BN_bin2bn(n.data(), static_cast<int>(n.size()), nullptr), BN_free);
  std::unique_ptr<BIGNUM, decltype(&BN_free)> bn_e(
      BN_bin2bn(e.data(), static_cast<int>(e.size()), nullptr), BN_free);
  std::unique_ptr<OSSL_PARAM_BLD, decltype(&OSSL_PARAM_BLD_free)> bld(OSSL_PARAM_BLD_new(),
                                                                      OSSL_PARAM_BLD_free);
  if (!bn_n || !bn_e || !bld ||
      !OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, bn_n.get()) ||
      !OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, bn_e.get())) {
    return Status::error(ErrorKind::kInternal, "RSA key: out of memory");
  }
  return from_params("RSA", bld.get());
}

Result<PkeyPtr> ec_public_key(const char* group, const Bytes& x, const Bytes& y) {
  const size_t size = std::string_view(group) == "P-256" ? 32 : std::string_view(group) == "P-384" ? 48 : 0;
  if (size == 0 || x.empty() || y.empty() || x.size() > size || y.size() > size) {
    return Status::error(ErrorKind::kInvalidArgument, "EC key: unsupported curve or bad point");
  }
  Bytes point(1 + 2 * size, 0);
  point[0] = 0x04;  // uncompressed
  std::copy(x.begin(), x.end(), point.begin() + 1 + static_cast<long>(size - x.size()));
  std::copy(y.begin(), y.end(), point.begin() + 1 + static_cast<long>(2 * size - y.size()));
  std::unique_ptr<OSSL_PARAM_BLD, decltype(&OSSL_PARAM_BLD_free)> bld(OSSL_PARAM_BLD_new(),
                                                                      OSSL_PARAM_BLD_free);
  if (!bld ||
      !OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, group, 0) ||
      !OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(),
                                        point.size())) {
    return Status::error(ErrorKind::kInternal, "EC key: out of memory");
  }
  return from_params("EC", bld.get());
}

}  // namespace keygate
