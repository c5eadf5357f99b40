#include "unlocker/token.h"

#include "core/crypto.h"
#include "core/json.h"
#include "core/protocol.h"
#include "tpm/tpm2_format.h"

namespace keygate::unlocker {

Status check_server_url(const std::string& url) {
  auto bad = [&](const char* why) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("server '", printable(url, 64), "': ", why));
  };
  if (url.size() > kMaxServerUrlLength) return bad("longer than 256 characters");
  if (url.rfind("https://", 0) != 0) {
    return bad("must be an https:// URL (the key server is never asked in clear text)");
  }
  if (url.size() == 8) return bad("no host");
  for (unsigned char c : url) {
    if (c <= 0x20 || c >= 0x7f) return bad("holds a space or a control or non-ASCII character");
  }
  return Status::ok();
}

Status check_server_list(const std::vector<std::string>& urls, const char* option) {
  if (urls.empty()) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("needs at least one ", option, " https://HOST:PORT"));
  }
  if (urls.size() > kMaxTokenServers) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("at most ", kMaxTokenServers, " ", option));
  }
  for (const auto& url : urls) {
    KEYGATE_RETURN_IF_ERROR(check_server_url(url).with_context(option));
    // New servers only: a token written before this rule still parses.
    for (const char* part : {"?", "#", "@"}) {
      if (url.find(part) != std::string::npos) {
        return Status::error(ErrorKind::kInvalidArgument,
                             str_cat(option, ": server '", printable(url, 64),
                                     "': holds a query, fragment or user name"));
      }
    }
  }
  return Status::ok();
}

Json::Value TokenTpm::to_json() const {
  Json::Value v(Json::objectValue);
  v["bank"] = bank;
  v["pcrs"] = Json::Value(Json::arrayValue);
  for (uint32_t p : pcrs) v["pcrs"].append(p);
  if (ak_handle != 0) v["ak_handle"] = ak_handle;
  if (!sealed.empty()) v["sealed"] = base64_encode(sealed);
  return v;
}

Result<TokenTpm> TokenTpm::from_json(const Json::Value& v) {
  auto bad = [](const char* what) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("keygate token: tpm ", what));
  };
  if (!v.isObject()) return bad("is not an object");
  TokenTpm t;
  auto bank = json_string(v, "bank", 16);
  if (!bank.is_ok() || tpm::hash_alg_from_name(bank.value()) == 0) return bad("bank");
  t.bank = bank.value();
  const Json::Value& pcrs = v["pcrs"];
  if (!pcrs.isArray() || pcrs.empty() || pcrs.size() > tpm::kMaxPcrIndex + 1) return bad("PCR list");
  for (const auto& p : pcrs) {
    if (!p.isUInt() || p.asUInt() > tpm::kMaxPcrIndex) return bad("PCR list");
    if (!t.pcrs.empty() && p.asUInt() <= t.pcrs.back()) return bad("PCR list (ascending, no repeats)");
    t.pcrs.push_back(p.asUInt());
  }
  if (v.isMember("ak_handle")) {
    if (!v["ak_handle"].isUInt() || (v["ak_handle"].asUInt() >> 24) != 0x81) return bad("ak_handle");
    t.ak_handle = v["ak_handle"].asUInt();
  }
  if (v.isMember("sealed")) {
    auto blob = v["sealed"].isString() && v["sealed"].asString().size() < 4096
                    ? base64_decode(v["sealed"].asString())
                    : Result<Bytes>(Status::error(ErrorKind::kInvalidArgument, ""));
    if (!blob.is_ok() || blob->empty()) return bad("sealed object");
    t.sealed = std::move(blob).value();
  }
  return t;
}

Json::Value KeygateToken::to_json() const {
  Json::Value v(Json::objectValue);
  v["type"] = kTokenType;
  v["keyslots"] = Json::Value(Json::arrayValue);
  v["keyslots"].append(std::to_string(keyslot));
  v["keygate_version"] = 1;
  v["volume_id"] = volume_id;
  v["servers"] = Json::Value(Json::arrayValue);
  for (const auto& s : servers) v["servers"].append(s);
  v["ca"] = ca_pem;
  v["ca_sha256"] = ca_sha256;
  v["attestation"] = attestation;
  if (tpm) v["tpm"] = tpm->to_json();
  return v;
}

Result<KeygateToken> KeygateToken::from_json(const Json::Value& v) {
  KeygateToken t;
  auto type = json_string(v, "type", 32);
  if (!type.is_ok() || type.value() != kTokenType) {
    return Status::error(ErrorKind::kInvalidArgument, "not a keygate token");
  }
  if (!v["keyslots"].isArray() || v["keyslots"].size() != 1 || !v["keyslots"][0].isString()) {
    return Status::error(ErrorKind::kInvalidArgument, "keygate token: needs exactly one keyslot");
  }
  try {
    t.keyslot = std::stoi(v["keyslots"][0].asString());
  } catch (...) {
    return Status::error(ErrorKind::kInvalidArgument, "keygate token: bad keyslot");
  }
  auto vid = json_string(v, "volume_id", api::kMaxVolumeIdLength);
  auto ca = json_string(v, "ca", 8192);
  auto fp = json_string(v, "ca_sha256", 64);
  auto att = json_optional_string(v, "attestation", 32, "aws");
  for (const Status* s : {&vid.status(), &ca.status(), &fp.status(), &att.status()}) {
    if (!s->is_ok()) return s->with_context("keygate token");
  }
  if (!api::is_valid_volume_id(vid.value())) {
    return Status::error(ErrorKind::kInvalidArgument, "keygate token: bad volume id");
  }
  t.volume_id = vid.value();
  t.ca_pem = ca.value();
  t.ca_sha256 = fp.value();
  t.attestation = att.value();
  auto actual = certificate_sha256_fingerprint(t.ca_pem);
  if (!actual.is_ok() || actual.value() != t.ca_sha256) {
    return Status::error(ErrorKind::kUntrusted,
                         "keygate token: CA certificate does not match its pinned fingerprint");
  }
  const Json::Value& servers = v["servers"];
  if (!servers.isArray() || servers.empty() || servers.size() > kMaxTokenServers) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("keygate token: needs 1 to ", kMaxTokenServers, " servers"));
  }
  for (const auto& s : servers) {
    if (!s.isString()) {
      return Status::error(ErrorKind::kInvalidArgument, "keygate token: a server is not a string");
    }
    KEYGATE_RETURN_IF_ERROR(check_server_url(s.asString()).with_context("keygate token"));
    t.servers.push_back(s.asString());
  }
  if (v.isMember("tpm")) {
    auto tpm = TokenTpm::from_json(v["tpm"]);
    if (!tpm.is_ok()) return tpm.status();
    t.tpm = std::move(tpm).value();
  }
  return t;
}

Result<KeygateToken> KeygateToken::parse(std::string_view json) {
  auto parsed = parse_json_object(json, kMaxTokenJson);
  if (!parsed.is_ok()) return parsed.status().with_context("keygate token");
  return from_json(parsed.value());
}

}  // namespace keygate::unlocker
