#include "server/cms_shape.h"

#include <algorithm>

namespace keygate::server {

const Oid kOidSha256 = {0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01};
const Oid kOidRsaEncryption = {0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01};
const Oid kOidSha256WithRsa = {0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b};

namespace {

const Oid kOidSignedData = {0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02};
const Oid kOidData = {0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01};

// A minimal, bounded BER reader.
struct Tlv {
  uint8_t tag = 0;
  const uint8_t* content = nullptr;  // primitive content
  size_t length = 0;
  std::vector<Tlv> children;  // constructed
};

constexpr int kMaxDepth = 12;
constexpr size_t kMaxNodes = 512;

bool read_tlv(const uint8_t* data, size_t size, size_t& pos, int depth, size_t& nodes, Tlv& out);

bool read_children(const uint8_t* data, size_t end, size_t& pos, bool indefinite, int depth,
                   size_t& nodes, std::vector<Tlv>& children) {
  while (true) {
    if (indefinite) {
      if (pos + 2 > end) return false;
      if (data[pos] == 0 && data[pos + 1] == 0) {
        pos += 2;
        return true;
      }
    } else if (pos == end) {
      return true;
    }
    Tlv child;
    if (!read_tlv(data, end, pos, depth + 1, nodes, child)) return false;
    children.push_back(std::move(child));
  }
}

bool read_tlv(const uint8_t* data, size_t size, size_t& pos, int depth, size_t& nodes, Tlv& out) {
  if (depth > kMaxDepth || ++nodes > kMaxNodes || pos + 2 > size) return false;
  out.tag = data[pos++];
  if ((out.tag & 0x1f) == 0x1f || out.tag == 0) return false;  // no multi-byte tags, no EOC here
  const bool constructed = (out.tag & 0x20) != 0;
  uint8_t first = data[pos++];
  if (first == 0x80) {
    if (!constructed) return false;
    return read_children(data, size, pos, true, depth, nodes, out.children);
  }
  size_t length = first;
  if (first & 0x80) {
    int n = first & 0x7f;
    if (n == 0 || n > 3 || pos + n > size) return false;
    length = 0;
    for (int i = 0; i < n; ++i) length = (length << 8) | data[pos++];
  }
  if (length > size - pos) return false;
  if (!constructed) {
    out.content = data + pos;
    out.length = length;
    pos += length;
    return true;
  }
  size_t end = pos + length;
  if (!read_children(data, end, pos, false, depth, nodes, out.children)) return false;
  return pos == end;
}

bool is_primitive(const Tlv& t, uint8_t tag, const Bytes& value) {
  return t.tag == tag && t.children.empty() && t.length == value.size() &&
         std::equal(value.begin(), value.end(), t.content);
}

// AlgorithmIdentifier: one of `oids`, then nothing or an exact NULL.
bool is_algorithm(const Tlv& t, const std::vector<Oid>& oids) {
  if (t.tag != 0x30 || t.children.empty() || t.children.size() > 2) return false;
  bool oid_ok = false;
  for (const auto& oid : oids) oid_ok = oid_ok || is_primitive(t.children[0], 0x06, oid);
  return oid_ok && (t.children.size() == 1 || is_primitive(t.children[1], 0x05, {}));
}

}  // namespace

Status check_cms_shape(const Bytes& der, const CmsShape& shape) {
  Tlv root;
  size_t pos = 0, nodes = 0;
  if (!read_tlv(der.data(), der.size(), pos, 0, nodes, root) || pos != der.size()) {
    return Status::error(ErrorKind::kInvalidArgument, shape.what + ": malformed encoding");
  }
  auto bad = [&shape](const char* what) {
    return Status::error(ErrorKind::kIntegrity, str_cat(shape.what, ": unexpected ", what));
  };
  if (root.tag != 0x30 || root.children.size() != 2 ||
      !is_primitive(root.children[0], 0x06, kOidSignedData) || root.children[1].tag != 0xa0 ||
      root.children[1].children.size() != 1) {
    return bad("content info");
  }
  const Tlv& sd = root.children[1].children[0];
  const size_t sd_fields = shape.certificates ? 5 : 4;
  if (sd.tag != 0x30 || sd.children.size() != sd_fields) return bad("signed data layout");
  if (!is_primitive(sd.children[0], 0x02, {0x01})) return bad("signed data version");
  const Tlv& digests = sd.children[1];
  if (digests.tag != 0x31 || digests.children.size() != 1 ||
      !is_algorithm(digests.children[0], shape.digest_algorithms)) {
    return bad("digest algorithms");
  }
  const Tlv& encap = sd.children[2];
  if (encap.tag != 0x30 || encap.children.size() != 2 ||
      !is_primitive(encap.children[0], 0x06, kOidData) || encap.children[1].tag != 0xa0 ||
      encap.children[1].children.size() != 1) {
    return bad("encapsulated content");
  }
  const Tlv& octets = encap.children[1].children[0];
  if (octets.tag == 0x24) {
    for (const Tlv& chunk : octets.children) {
      if (chunk.tag != 0x04) return bad("content chunk");
    }
  } else if (octets.tag != 0x04) {
    return bad("content type");
  }
  if (shape.certificates) {
    const Tlv& certs = sd.children[3];
    if (certs.tag != 0xa0 || certs.children.empty() || certs.children.size() > 4) {
      return bad("certificate set");
    }
    for (const Tlv& cert : certs.children) {
      if (cert.tag != 0x30) return bad("certificate choice");
    }
  }
  const Tlv& signers = sd.children[sd_fields - 1];
  if (signers.tag != 0x31 || signers.children.size() != 1) return bad("signer count");
  const Tlv& si = signers.children[0];
  const size_t si_fields = shape.signed_attributes ? 6 : 5;
  if (si.tag != 0x30 || si.children.size() != si_fields) return bad("signer info layout");
  if (!is_primitive(si.children[0], 0x02, {0x01})) return bad("signer info version");
  if (si.children[1].tag != 0x30) return bad("signer identifier");
  if (!is_algorithm(si.children[2], shape.digest_algorithms)) {
    return bad("signer digest algorithm");
  }
  size_t next = 3;
  if (shape.signed_attributes && si.children[next++].tag != 0xa0) return bad("signed attributes");
  if (!is_algorithm(si.children[next++], shape.signature_algorithms)) {
    return bad("signature algorithm");
  }
  if (si.children[next].tag != 0x04) return bad("signature value");
  return Status::ok();
}

}  // namespace keygate::server
