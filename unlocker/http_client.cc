#include "unlocker/http_client.h"

#include <curl/curl.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include <mutex>

#include "core/log.h"

namespace keygate::unlocker {
namespace {

struct Sink {
  std::string* out;
  size_t max;
  bool overflow = false;
};

size_t on_body(char* data, size_t size, size_t nmemb, void* user) {
  Sink* sink = static_cast<Sink*>(user);
  size_t n = size * nmemb;
  if (sink->out->size() + n > sink->max) {
    sink->overflow = true;
    return 0;  // aborts the transfer
  }
  sink->out->append(data, n);
  return n;
}

size_t on_header(char* data, size_t size, size_t nmemb, void* user) {
  auto* headers = static_cast<std::vector<std::pair<std::string, std::string>>*>(user);
  const size_t n = size * nmemb;
  add_header_line(std::string_view(data, n), headers);
  return n;
}

std::string ms(CURL* curl, CURLINFO what) {
  curl_off_t us = 0;
  curl_easy_getinfo(curl, what, &us);
  return str_cat(us / 1000, ".", us / 100 % 10);
}

// "POST URL: HTTP 200 in 2.1 ms (connected 0.1, TLS 1.2, first byte 2.0)":
// where a slow request spent its time.
std::string timing(CURL* curl, const HttpRequest& req, long status) {
  std::string line = str_cat(req.method, " ", req.url, ": HTTP ", status, " in ",
                             ms(curl, CURLINFO_TOTAL_TIME_T), " ms (connected ",
                             ms(curl, CURLINFO_CONNECT_TIME_T));
  if (req.url.rfind("https://", 0) == 0) {
    line += str_cat(", TLS ", ms(curl, CURLINFO_APPCONNECT_TIME_T));
  }
  return line + str_cat(", first byte ", ms(curl, CURLINFO_STARTTRANSFER_TIME_T), ")");
}

void global_init() {
  static std::once_flag once;
  std::call_once(once, [] {
    curl_global_init(CURL_GLOBAL_DEFAULT);
    log_debug("HTTP client library initialised");
  });
}

}  // namespace

void add_header_line(std::string_view line,
                     std::vector<std::pair<std::string, std::string>>* headers) {
  const auto colon = line.find(':');
  if (colon == std::string_view::npos || headers->size() >= kMaxResponseHeaders) return;
  std::string_view value = line.substr(colon + 1);
  while (!value.empty() && (value.back() == '\r' || value.back() == '\n' || value.back() == ' ')) {
    value.remove_suffix(1);
  }
  while (!value.empty() && value.front() == ' ') value.remove_prefix(1);
  headers->emplace_back(std::string(line.substr(0, colon)), std::string(value));
}

void prepare_https() {
  global_init();
  unsigned char byte = 0;
  (void)RAND_bytes(&byte, 1);  // instantiates the DRBG; the byte is discarded
  SSL_CTX_free(SSL_CTX_new(TLS_client_method()));
  log_debug("TLS client ready");
}

HttpSession::HttpSession() {
  global_init();
  curl_ = curl_easy_init();
}

HttpSession::~HttpSession() {
  if (curl_) curl_easy_cleanup(static_cast<CURL*>(curl_));
}

Result<HttpResponse> HttpSession::perform(const HttpRequest& req) {
  const bool https = req.url.rfind("https://", 0) == 0;
  if (!https && req.url.rfind("http://", 0) != 0) {
    return Status::error(ErrorKind::kInvalidArgument, str_cat("unsupported URL ", req.url));
  }
  if (https && req.ca_pem.empty()) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat(req.url, ": no pinned CA to verify the server with"));
  }
  CURL* curl = static_cast<CURL*>(curl_);
  if (curl == nullptr) return Status::error(ErrorKind::kInternal, "curl_easy_init failed");
  // Forget the previous request's options; the connection cache survives.
  curl_easy_reset(curl);
  HttpResponse response;
  Sink sink{&response.body, req.max_response};
  char errbuf[CURL_ERROR_SIZE] = {0};
  curl_slist* headers = nullptr;
  for (const auto& h : req.headers) headers = curl_slist_append(headers, h.c_str());

  curl_easy_setopt(curl, CURLOPT_URL, req.url.c_str());
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_NOPROXY, "*");
  curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, https ? "https" : "http");
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, req.connect_timeout_ms);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, req.total_timeout_ms);
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errbuf);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &sink);
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &response.headers);
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(curl, CURLOPT_USERAGENT, "keygate/1");
  if (req.method == "POST") {
    curl_easy_setopt(curl, CURLOPT_POST, 1L);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, req.body ? reinterpret_cast<const char*>(req.body) : "");
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, static_cast<long>(req.body_size));
  } else if (req.method == "PUT") {
    // An empty body with an explicit Content-Length: 0.
    curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, "PUT");
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, "");
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, 0L);
  } else if (req.method != "GET") {
    curl_slist_free_all(headers);
    return Status::error(ErrorKind::kInternal, "unsupported method");
  }
  if (https) {
    curl_blob ca;
    ca.data = const_cast<char*>(req.ca_pem.data());
    ca.len = req.ca_pem.size();
    ca.flags = CURL_BLOB_COPY;
    curl_easy_setopt(curl, CURLOPT_SSLVERSION, CURL_SSLVERSION_TLSv1_2);
    // Debian's system default, set here since keygate reads no openssl.cnf:
    // no RSA keys under 2048 bits, no curves under 224 bits, no SHA-1
    // signatures.
    curl_easy_setopt(curl, CURLOPT_SSL_CIPHER_LIST, "DEFAULT:@SECLEVEL=2");
    curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 2L);
    // The pinned CA is the only trust anchor: no system bundle.
    curl_easy_setopt(curl, CURLOPT_CAINFO, nullptr);
    curl_easy_setopt(curl, CURLOPT_CAPATH, nullptr);
    curl_easy_setopt(curl, CURLOPT_CAINFO_BLOB, &ca);
    if (!req.client_cert_file.empty()) {
      curl_easy_setopt(curl, CURLOPT_SSLCERT, req.client_cert_file.c_str());
      curl_easy_setopt(curl, CURLOPT_SSLCERTTYPE, "PEM");
      curl_easy_setopt(curl, CURLOPT_SSLKEY, req.client_key_file.c_str());
      curl_easy_setopt(curl, CURLOPT_SSLKEYTYPE, "PEM");
    }
  }
  CURLcode rc = curl_easy_perform(curl);
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response.status);
  if (rc == CURLE_OK) log_debug(timing(curl, req, response.status));
  curl_slist_free_all(headers);

  if (sink.overflow) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat(req.url, ": response larger than ", req.max_response, " bytes"));
  }
  if (rc != CURLE_OK) {
    std::string why = errbuf[0] ? errbuf : curl_easy_strerror(rc);
    switch (rc) {
      case CURLE_PEER_FAILED_VERIFICATION:
      case CURLE_SSL_CACERT_BADFILE:
      case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
        return Status::error(ErrorKind::kUntrusted,
                             str_cat(req.url, ": server identity not trusted (", why, ")"));
      case CURLE_SSL_CERTPROBLEM:
        return Status::error(ErrorKind::kInvalidArgument,
                             str_cat(req.url, ": the client certificate or key is unusable (", why, ")"));
      default:
        return Status::error(ErrorKind::kUnavailable, str_cat(req.url, ": ", why));
    }
  }
  return response;
}

}  // namespace keygate::unlocker
