// libFuzzer target: what the unlocker reads from the network. The first
// byte picks an HTTP status; the rest is an answer's body, read as the key
// server's answer (error, challenge, unlock envelope, registration, a 202's
// approval request, whose id and instance reach the console) and as
// each cloud's metadata answer, and its lines as response header lines.
// Whatever is read must be bounded and printable where it can reach a
// console; an envelope that opens must have come from the real key.
#include <cstdint>

#include "core/encoding.h"
#include "core/envelope.h"
#include "core/json.h"
#include "core/protocol.h"
#include "tests/fuzz/fuzz_fixtures.h"
#include "unlocker/evidence.h"
#include "unlocker/server_client.h"

using namespace keygate;
using namespace keygate::unlocker;

namespace {

X25519KeyPair* g_keys = nullptr;
constexpr long kStatuses[] = {200, 400, 403, 404, 409, 429, 500, 503, 202, 0};

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_keys = new X25519KeyPair(X25519KeyPair::generate().value());
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0 || size > api::kMaxResponseBody + 1) return 0;  // the client reads no more
  const long status = kStatuses[data[0] % (sizeof(kStatuses) / sizeof(kStatuses[0]))];
  const std::string body(fuzz::text_of(data + 1, size - 1));

  auto answer = read_server_answer(status, body, "https://keys.example");
  if (!answer.is_ok()) {
    // The server's words, as the console will show them: printable, and
    // within printable()'s bound (each kept byte at most 4 characters, the
    // code cut to 64 bytes, the message to 200).
    const std::string& m = answer.status().message();
    if (m.size() > 64 + 4 * (64 + 200) + 8 || !is_display_text(m)) abort();
    for (char c : m) {
      if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) abort();
    }
  } else {
    (void)read_challenge(answer.value());
    const Bytes nonce(api::kNonceSize, 7);
    // Sealed to a key the fuzzer never had: must not open.
    if (open_envelope(answer.value(), *g_keys, "00000000-0000-4000-8000-000000000001", nonce).is_ok()) {
      abort();
    }
    if (read_registration(answer.value(), *g_keys, nonce).is_ok()) abort();
  }

  if (auto parsed = parse_json_object(body, api::kMaxResponseBody); parsed.is_ok()) {
    auto pending = read_pending_approval(parsed.value());
    if (pending.is_ok()) {
      const std::string& id = pending->request_id;
      if (id.empty() || id.size() > 64 || id.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789-") != std::string::npos) {
        abort();
      }
      if (pending->instance.size() > 4 * 64 + 3 || !is_display_text(pending->instance)) abort();
      for (char c : pending->instance) {
        if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) abort();
      }
      if (pending->expires_in_s < 0 || pending->expires_in_s > 86400) abort();
    }
  }

  HttpResponse r{status, body, {}};
  auto token = aws_session_token_from(r);
  if (token.is_ok() && token->find_first_of(" \r\n") != std::string::npos) abort();
  (void)aws_evidence_from(r);
  (void)gcp_evidence_from(r);
  (void)azure_evidence_from(r);

  std::vector<std::pair<std::string, std::string>> headers;
  size_t start = 0;
  while (start <= body.size()) {
    size_t end = body.find('\n', start);
    if (end == std::string::npos) end = body.size();
    add_header_line(std::string_view(body).substr(start, end - start + (end < body.size())), &headers);
    start = end + 1;
  }
  if (headers.size() > kMaxResponseHeaders) abort();
  return 0;
}
