#include "unlocker/luks.h"

#include <blkid/blkid.h>
#include <fcntl.h>
#include <libcryptsetup.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "core/crypto.h"
#include "core/json.h"
#include "core/log.h"
#include "core/protocol.h"

namespace keygate::unlocker {
namespace {


Status cs_error(const std::string& what, const std::string& path, int rc) {
  ErrorKind kind = rc == -ENOMEM ? ErrorKind::kInternal : ErrorKind::kIo;
  return Status::error(kind, str_cat(what, "(", path, "): ", strerror(-rc)));
}

void apply_cost(crypt_device* cd, KeyslotCost cost) {
  crypt_pbkdf_type pbkdf{};
  if (cost == KeyslotCost::kHighEntropySecret) {
    pbkdf.type = CRYPT_KDF_PBKDF2;
    // SHA-512 also becomes the keyslot's anti-forensic hash: a 64-byte
    // volume key then diffuses with one hash per stripe instead of two
    // (4000 instead of 8000 on every unlock), and PBKDF2 needs one output
    // block instead of two. The secret is 32 random bytes: the hash choice
    // adds no strength to protect, only time to save.
    pbkdf.hash = "sha512";
    pbkdf.iterations = 1000;  // libcryptsetup's minimum
    pbkdf.flags = CRYPT_PBKDF_NO_BENCHMARK;
  } else {
    // Fixed, not benchmarked: a cost measured on a fast build host would take
    // minutes on a small instance. 32 MiB x 4 passes opens in about a second
    // on one slow core and fits a 512 MiB instance.
    pbkdf.type = CRYPT_KDF_ARGON2ID;
    pbkdf.hash = "sha256";
    pbkdf.iterations = 4;
    pbkdf.max_memory_kb = 32 * 1024;
    pbkdf.parallel_threads = 1;
    pbkdf.flags = CRYPT_PBKDF_NO_BENCHMARK;
  }
  crypt_set_pbkdf_type(cd, &pbkdf);
}

void log_callback(int level, const char* msg, void* usrptr) {
  bool debug = usrptr != nullptr;
  std::string text = msg ? msg : "";
  while (!text.empty() && text.back() == '\n') text.pop_back();
  if (text.empty()) return;
  if (level == CRYPT_LOG_ERROR) {
    log_warning(str_cat("libcryptsetup: ", text));
  } else if (debug) {
    log_debug(str_cat("libcryptsetup: ", text));
  }
}

}  // namespace

void install_cryptsetup_logging(bool debug) {
  crypt_set_log_callback(nullptr, log_callback, debug ? reinterpret_cast<void*>(1) : nullptr);
  if (debug) crypt_set_debug_level(CRYPT_DEBUG_ALL);
}

LuksDevice::~LuksDevice() {
  if (cd_) crypt_free(cd_);
}
LuksDevice::LuksDevice(LuksDevice&& o) noexcept : cd_(o.cd_), path_(std::move(o.path_)) {
  o.cd_ = nullptr;
}
LuksDevice& LuksDevice::operator=(LuksDevice&& o) noexcept {
  if (this != &o) {
    if (cd_) crypt_free(cd_);
    cd_ = o.cd_;
    path_ = std::move(o.path_);
    o.cd_ = nullptr;
  }
  return *this;
}

Result<LuksDevice> LuksDevice::open(const std::string& path) {
  crypt_device* cd = nullptr;
  int rc = crypt_init(&cd, path.c_str());
  if (rc < 0) return cs_error("crypt_init", path, rc);
  LuksDevice dev(cd, path);
  rc = crypt_load(cd, CRYPT_LUKS2, nullptr);
  if (rc < 0) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("crypt_load(", path, "): not a LUKS2 device (", strerror(-rc),
                                 ")"));
  }
  return dev;
}

Result<LuksDevice> LuksDevice::format(const std::string& path, int sector_size) {
  crypt_device* cd = nullptr;
  int rc = crypt_init(&cd, path.c_str());
  if (rc < 0) return cs_error("crypt_init", path, rc);
  LuksDevice dev(cd, path);
  crypt_params_luks2 params{};
  params.sector_size = static_cast<uint32_t>(sector_size);
  apply_cost(cd, KeyslotCost::kHighEntropySecret);
  rc = crypt_format(cd, CRYPT_LUKS2, "aes", "xts-plain64", nullptr, nullptr, 64, &params);
  if (rc < 0) return cs_error("crypt_format", path, rc);
  return dev;
}

Result<std::vector<std::pair<int, KeygateToken>>> LuksDevice::keygate_tokens(size_t at_most) {
  std::vector<std::pair<int, KeygateToken>> out;
  for (int id = 0; id < 32 && out.size() < at_most; ++id) {
    const char* type = nullptr;
    crypt_token_info info = crypt_token_status(cd_, id, &type);
    if (info == CRYPT_TOKEN_INACTIVE || info == CRYPT_TOKEN_INVALID) continue;
    if (type == nullptr || strcmp(type, kTokenType) != 0) continue;
    const char* json = nullptr;
    int rc = crypt_token_json_get(cd_, id, &json);
    if (rc < 0) return cs_error("crypt_token_json_get", path_, rc);
    auto token = KeygateToken::parse(json);
    if (!token.is_ok()) return token.status().with_context(str_cat(path_, " token ", id));
    out.emplace_back(id, std::move(token).value());
  }
  return out;
}

Result<std::optional<std::pair<int, KeygateToken>>> LuksDevice::find_keygate_token() {
  auto all = keygate_tokens(1);
  if (!all.is_ok()) return all.status();
  if (all->empty()) return std::optional<std::pair<int, KeygateToken>>();
  return std::optional<std::pair<int, KeygateToken>>(std::move(all->front()));
}

Result<int> LuksDevice::add_token(const KeygateToken& token) {
  int rc = crypt_token_json_set(cd_, CRYPT_ANY_TOKEN, to_json(token.to_json()).c_str());
  if (rc < 0) return cs_error("crypt_token_json_set", path_, rc);
  return rc;
}

Status LuksDevice::remove_token(int token_id) {
  int rc = crypt_token_json_set(cd_, token_id, nullptr);
  if (rc < 0) return cs_error("remove token", path_, rc);
  return Status::ok();
}

Result<int> LuksDevice::add_keyslot_after_format(const SecretBuffer& passphrase, KeyslotCost cost) {
  apply_cost(cd_, cost);
  int rc = crypt_keyslot_add_by_volume_key(cd_, CRYPT_ANY_SLOT, nullptr, 0,
                                           reinterpret_cast<const char*>(passphrase.data()),
                                           passphrase.size());
  if (rc < 0) return cs_error("crypt_keyslot_add_by_volume_key", path_, rc);
  return rc;
}

Result<int> LuksDevice::add_keyslot(const SecretBuffer& existing, const SecretBuffer& passphrase,
                                    KeyslotCost cost) {
  apply_cost(cd_, cost);
  int rc = crypt_keyslot_add_by_passphrase(
      cd_, CRYPT_ANY_SLOT, reinterpret_cast<const char*>(existing.data()), existing.size(),
      reinterpret_cast<const char*>(passphrase.data()), passphrase.size());
  if (rc == -EPERM) {
    return Status::error(ErrorKind::kRefused,
                         str_cat("add keyslot(", path_, "): the existing passphrase opens no keyslot"));
  }
  if (rc < 0) return cs_error("crypt_keyslot_add_by_passphrase", path_, rc);
  return rc;
}

Status LuksDevice::destroy_keyslot(int keyslot) {
  int rc = crypt_keyslot_destroy(cd_, keyslot);
  if (rc < 0) return cs_error("crypt_keyslot_destroy", path_, rc);
  return Status::ok();
}

Result<int> LuksDevice::activate(const std::string& name, int keyslot,
                                 const SecretBuffer& passphrase) {
  int rc = crypt_activate_by_passphrase(cd_, name.empty() ? nullptr : name.c_str(),
                                        keyslot < 0 ? CRYPT_ANY_SLOT : keyslot,
                                        reinterpret_cast<const char*>(passphrase.data()),
                                        passphrase.size(), 0);
  if (rc == -EPERM) {
    return Status::error(ErrorKind::kRefused,
                         str_cat("activate(", path_, "): key does not open keyslot ",
                                 keyslot < 0 ? std::string("any") : std::to_string(keyslot)));
  }
  if (rc == -EEXIST) {
    return Status::error(ErrorKind::kConflict,
                         str_cat("activate(", path_, "): mapping ", name, " already exists"));
  }
  if (rc < 0) return cs_error(str_cat("activate ", name.empty() ? "(verify only)" : name), path_, rc);
  return rc;
}

Json::Value LuksDevice::describe() {
  Json::Value v(Json::objectValue);
  v["device"] = path_;
  const char* uuid = crypt_get_uuid(cd_);
  v["uuid"] = uuid ? uuid : "";
  v["keyslots"] = Json::Value(Json::arrayValue);
  for (int slot = 0; slot < crypt_keyslot_max(CRYPT_LUKS2); ++slot) {
    crypt_keyslot_info info = crypt_keyslot_status(cd_, slot);
    if (info == CRYPT_SLOT_ACTIVE || info == CRYPT_SLOT_ACTIVE_LAST) {
      Json::Value s;
      s["keyslot"] = slot;
      crypt_pbkdf_type pbkdf{};
      if (crypt_keyslot_get_pbkdf(cd_, slot, &pbkdf) == 0 && pbkdf.type) s["kdf"] = pbkdf.type;
      v["keyslots"].append(s);
    }
  }
  return v;
}

Status LuksDevice::erase_header() {
  uint64_t data_offset_bytes = crypt_get_data_offset(cd_) * 512;
  if (data_offset_bytes == 0) data_offset_bytes = 16 * 1024 * 1024;
  int fd = ::open(path_.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return Status::error(ErrorKind::kIo, str_cat("open ", path_, ": ", strerror(errno)));
  std::vector<char> zeros(1 << 20, 0);
  uint64_t done = 0;
  while (done < data_offset_bytes) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(zeros.size(), data_offset_bytes - done));
    ssize_t w = pwrite(fd, zeros.data(), n, static_cast<off_t>(done));
    if (w <= 0) {
      int err = errno;
      close(fd);
      return Status::error(ErrorKind::kIo, str_cat("erase header of ", path_, ": ", strerror(err)));
    }
    done += static_cast<uint64_t>(w);
  }
  fsync(fd);
  close(fd);
  return Status::ok();
}

namespace {

// Frees a crypt_device when it goes out of scope.
struct CryptDeviceOwner {
  crypt_device* cd = nullptr;
  ~CryptDeviceOwner() {
    if (cd) crypt_free(cd);
  }
};

struct ProgressContext {
  const std::function<void(uint64_t, uint64_t)>* report;
};

int reencrypt_progress(uint64_t size, uint64_t offset, void* usrptr) {
  auto* ctx = static_cast<ProgressContext*>(usrptr);
  (*ctx->report)(offset, size);
  return 0;  // never abort
}

Status run_reencryption(crypt_device* cd, const std::string& path,
                        const std::function<void(uint64_t, uint64_t)>& progress) {
  ProgressContext ctx{&progress};
  int rc = crypt_reencrypt_run(cd, reencrypt_progress, &ctx);
  if (rc < 0) return cs_error("crypt_reencrypt_run", path, rc);
  return Status::ok();
}

}  // namespace

Status encrypt_in_place(const std::string& path, const SecretBuffer& passphrase,
                        uint64_t reduce_bytes,
                        const std::function<void(uint64_t, uint64_t)>& progress) {
  const char* pass = reinterpret_cast<const char*>(passphrase.data());
  // Resume an encryption that was interrupted (the header says so).
  {
    CryptDeviceOwner owner;
    if (crypt_init(&owner.cd, path.c_str()) < 0) {
      return Status::error(ErrorKind::kInvalidArgument, str_cat("open ", path));
    }
    crypt_device* cd = owner.cd;
    if (crypt_load(cd, CRYPT_LUKS2, nullptr) == 0) {
      if (crypt_reencrypt_status(cd, nullptr) == CRYPT_REENCRYPT_NONE) {
        return Status::error(ErrorKind::kConflict, str_cat(path, " is already LUKS2-encrypted"));
      }
      log_info(str_cat(path, ": resuming interrupted encryption"));
      crypt_params_reencrypt resume{};
      resume.flags = CRYPT_REENCRYPT_RESUME_ONLY;
      int rc = crypt_reencrypt_init_by_passphrase(cd, nullptr, pass, passphrase.size(),
                                                  CRYPT_ANY_SLOT, CRYPT_ANY_SLOT, nullptr,
                                                  nullptr, &resume);
      if (rc == -EPERM) {
        return Status::error(ErrorKind::kRefused, str_cat(path, ": wrong recovery passphrase"));
      }
      if (rc < 0) return cs_error("resume encryption", path, rc);
      return run_reencryption(cd, path, progress);
    }
  }
  if (reduce_bytes < 2 * 1024 * 1024 || reduce_bytes % (2 * 4096) != 0) {
    return Status::error(ErrorKind::kInvalidArgument,
                         "header space must be at least 2 MiB and a multiple of 8 KiB");
  }
  // The new header is written to a private file first, then placed at the
  // head of the device once the first data segment has moved.
  const char* tmpdir = getenv("TMPDIR");
  std::string header = str_cat(tmpdir && *tmpdir ? tmpdir : "/tmp", "/keygate-header-XXXXXX");
  int fd = mkstemp(header.data());
  if (fd < 0) return Status::error(ErrorKind::kIo, str_cat("temporary header: ", strerror(errno)));
  int falloc = posix_fallocate(fd, 0, 4096);
  close(fd);
  struct Unlink {
    std::string p;
    ~Unlink() { unlink(p.c_str()); }
  } cleanup{header};
  if (falloc != 0) return Status::error(ErrorKind::kIo, "temporary header: no space");

  const uint64_t shift_sectors = reduce_bytes / 2 / 512;
  crypt_params_luks2 luks2{};
  luks2.sector_size = 512;
  crypt_params_reencrypt params{};
  params.mode = CRYPT_REENCRYPT_ENCRYPT;
  params.direction = CRYPT_REENCRYPT_BACKWARD;
  params.resilience = "datashift";
  params.hash = "sha256";
  params.data_shift = shift_sectors;
  params.luks2 = &luks2;
  params.flags = CRYPT_REENCRYPT_INITIALIZE_ONLY | CRYPT_REENCRYPT_MOVE_FIRST_SEGMENT;
  int keyslot = -1;
  {
    CryptDeviceOwner owner;
    int rc = crypt_init_data_device(&owner.cd, header.c_str(), path.c_str());
    if (rc < 0) return cs_error("crypt_init_data_device", path, rc);
    crypt_device* cd = owner.cd;
    rc = crypt_set_data_offset(cd, shift_sectors);
    if (rc < 0) return cs_error("crypt_set_data_offset", path, rc);
    apply_cost(cd, KeyslotCost::kRecoveryPassphrase);
    rc = crypt_format(cd, CRYPT_LUKS2, "aes", "xts-plain64", nullptr, nullptr, 64, &luks2);
    if (rc < 0) return cs_error("crypt_format", path, rc);
    keyslot = crypt_keyslot_add_by_volume_key(cd, CRYPT_ANY_SLOT, nullptr, 0, pass,
                                              passphrase.size());
    if (keyslot < 0) return cs_error("add recovery keyslot", path, keyslot);
    rc = crypt_reencrypt_init_by_passphrase(cd, nullptr, pass, passphrase.size(), CRYPT_ANY_SLOT,
                                            keyslot, "aes", "xts-plain64", &params);
    if (rc < 0) return cs_error("initialise encryption", path, rc);
  }
  CryptDeviceOwner owner;
  int rc = crypt_init(&owner.cd, path.c_str());
  if (rc < 0) return cs_error("crypt_init", path, rc);
  crypt_device* cd = owner.cd;
  rc = crypt_header_restore(cd, CRYPT_LUKS2, header.c_str());
  if (rc < 0) return cs_error("place header at the head of the device", path, rc);
  params.flags &= ~CRYPT_REENCRYPT_INITIALIZE_ONLY;
  rc = crypt_reencrypt_init_by_passphrase(cd, nullptr, pass, passphrase.size(), CRYPT_ANY_SLOT,
                                          keyslot, nullptr, nullptr, &params);
  if (rc < 0) return cs_error("start encryption", path, rc);
  return run_reencryption(cd, path, progress);
}

Status check_device_blank(const std::string& path) {
  blkid_probe pr = blkid_new_probe_from_filename(path.c_str());
  if (pr == nullptr) {
    return Status::error(ErrorKind::kInvalidArgument,
                         str_cat("probe ", path, ": cannot open (", strerror(errno), ")"));
  }
  blkid_probe_enable_superblocks(pr, 1);
  blkid_probe_set_superblocks_flags(pr, BLKID_SUBLKS_TYPE);
  blkid_probe_enable_partitions(pr, 1);
  blkid_probe_set_partitions_flags(pr, BLKID_PARTS_MAGIC);
  int rc = blkid_do_safeprobe(pr);
  std::string found;
  if (rc == 0) {
    const char* value = nullptr;
    if (blkid_probe_lookup_value(pr, "TYPE", &value, nullptr) == 0 && value) {
      found = value;
    } else if (blkid_probe_lookup_value(pr, "PTTYPE", &value, nullptr) == 0 && value) {
      found = str_cat("partition table ", value);
    } else {
      found = "a signature";
    }
  }
  blkid_free_probe(pr);
  if (rc == 0 || rc == -2) {
    return Status::error(ErrorKind::kConflict,
                         str_cat(path, " is not blank: it holds ",
                                 rc == -2 ? std::string("ambiguous signatures") : found,
                                 "; refusing to format"));
  }
  if (rc < 0) return Status::error(ErrorKind::kIo, str_cat("probe ", path, ": failed"));
  return Status::ok();
}

}  // namespace keygate::unlocker
