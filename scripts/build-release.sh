#!/usr/bin/env bash
# Release build of the unlocker: keygate as one static-pie binary, for the
# initramfs (nothing to copy beside it, and it starts in a few milliseconds
# where the shared build spends about 20 ms loading 50 libraries).
#
# Debian ships several of keygate's libraries only as shared objects
# (libcryptsetup, libdevmapper, TPM2-TSS, jsoncpp) or builds them with far more
# than keygate uses (libcurl: LDAP, Kerberos, HTTP/2, IDN...; OpenSSL: its
# providers as loadable modules, which a static program must never dlopen).
# So this script builds them from Debian's source packages (apt-get source:
# checked against the archive's signed index) into a prefix, each configured
# with only what keygate needs, then links keygate against them:
#
#   OpenSSL     no shared objects, no loadable modules, no engines; only the
#               algorithms and protocols keygate uses (no legacy provider, no
#               TLS below 1.2, no DH/DSA, no GOST, ...); OPENSSLDIR
#               /usr/lib/ssl as Debian's (keygate itself reads no openssl.cnf)
#   libdevmapper  (lvm2) no udev sync, no SELinux
#   libcryptsetup libgcrypt backend (cryptsetup's default; Debian's libgcrypt.a),
#               LUKS2 reencryption, no external tokens. With OpenSSL 3 as
#               its backend, every hash of a keyslot's 4000 anti-forensic
#               stripes pays a provider lookup (EVP_MD_fetch): about 3 ms of
#               a 26 ms unlock, measured here. One patch
#               (scripts/patches/cryptsetup-af-one-hash-context.patch): the
#               anti-forensic merge hashes all stripes with one context
#               instead of opening one per block (2 to 3 ms more)
#   libcurl     HTTP and HTTPS only, OpenSSL, threaded resolver
#   jsoncpp     static
#   TPM2-TSS    ESAPI, MU, RC, the device and swtpm TCTIs; no FAPI. Debian 12's
#               3.2.1 source is no longer on the mirror, so this takes the
#               4.1.3 upstream tarball from the archive's pool, pinned by its
#               SHA-256.
#
# The prefix is cached (KEYGATE_DEPS_DIR, default /var/cache/keygate/release-deps)
# under a key made of the library build steps below, the patches and the
# source versions; a fresh machine builds it once (about 8 minutes on 2 cores).
#
# Usage: scripts/build-release.sh [BUILD_DIR]     (default: build-release)
# Result: BUILD_DIR/dist/keygate (stripped) and BUILD_DIR/dist/keygate.debug.
set -euo pipefail
self=$(readlink -f "$0")
cd "$(dirname "$self")/.."
root=$(pwd)
build=${1:-$root/build-release}
deps=${KEYGATE_DEPS_DIR:-/var/cache/keygate/release-deps}
jobs=$(nproc)

say() { echo "build-release: $*"; }
die() { echo "build-release: $*" >&2; exit 1; }

# --- Debian source packages --------------------------------------------------
src_list=/etc/apt/sources.list.d/keygate-deb-src.sources
if ! apt-get indextargets --format '$(CREATED_BY) $(CODENAME)' 2>/dev/null | grep -qx 'Sources bookworm'; then
  [ "$(id -u)" -eq 0 ] || die "need root to add the deb-src line ($src_list)"
  say "adding Debian's source index ($src_list)"
  cat >"$src_list" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt-get update -q
fi

# Debian 12's source versions of a package (bookworm, -updates, -security;
# not another release's, should the machine list one), newest first: an older
# one is taken when the mirror no longer carries the newest's files.
candidates() {
  apt-cache madison "$1" | awk -F'|' '$3 ~ /bookworm/ && $3 ~ /Sources/ { gsub(/ /, "", $2); print $2 }' |
    sort -rV | uniq
}

tss_version=4.1.3
tss_tarball=tpm2-tss_${tss_version}.orig.tar.gz
tss_sha256=8a389bda64690910e7af7deaf64703a3faed416dc538c9c3e4f893f24893524d
tss_url=http://deb.debian.org/debian/pool/main/t/tpm2-tss/$tss_tarball

key=$( { sed -n '/^# --- libraries/,/^# --- keygate/p' "$self" | sha256sum | cut -d' ' -f1
         for p in openssl lvm2 cryptsetup curl libjsoncpp; do echo "$p $(candidates "$p" | tr '\n' ' ')"; done
         echo "tpm2-tss $tss_version $tss_sha256"
         cat "$root"/scripts/patches/*.patch; } | sha256sum | cut -c1-16)
prefix=$deps/$key

# --- libraries (this part and the versions make the cache key) ----------------
if [ -f "$prefix/.complete" ]; then
  say "libraries: cached in $prefix"
else
  say "libraries: building into $prefix (once per version set)"
  src=$deps/src-$key
  mkdir -p "$prefix" "$src"
  logs=$src/logs
  mkdir -p "$logs"
  step() {  # name, command...: runs quietly, shows the log's tail on failure
    local name=$1; shift
    say "  $name"
    if ! "$@" >"$logs/$name.log" 2>&1; then
      tail -n 40 "$logs/$name.log" >&2
      die "$name failed (log: $logs/$name.log)"
    fi
  }
  fetch() {  # package -> unpacked source dir on stdout
    local pkg=$1 v
    rm -rf "$src/$pkg"
    mkdir -p "$src/$pkg"
    for v in $(candidates "$pkg"); do
      if (cd "$src/$pkg" && apt-get source -q "$pkg=$v" >"$logs/fetch-$pkg.log" 2>&1); then
        find "$src/$pkg" -mindepth 1 -maxdepth 1 -type d | head -n 1
        return
      fi
    done
    tail -n 5 "$logs/fetch-$pkg.log" >&2
    die "no source of $pkg could be fetched"
  }
  export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
  export CFLAGS="-O2 -g -fstack-protector-strong -D_FORTIFY_SOURCE=2 -ffunction-sections -fdata-sections"

  # Each library in a subshell (errexit does not apply in one that is tested,
  # so every command is checked); a finished one is not built again when a
  # later one failed.
  build() {  # name, function
    [ -f "$prefix/.done-$1" ] && return
    ( "$2" ) || die "$1: build failed"
    touch "$prefix/.done-$1"
  }

  openssl_() {
    d=$(fetch openssl) && cd "$d" || exit 1
    # Only what keygate uses (TLS 1.2/1.3 with ECDHE, RSA and ECDSA
    # certificates; X25519, HKDF, AES-GCM, SHA-1/2, HMAC; RSA, ECC and AES-CFB
    # for TPM sessions; SM4 stays, as TPM2-TSS links its SM4 session cipher
    # unconditionally): a smaller name map and method store make OpenSSL's
    # first-use setup cheaper (measured: library init, DRBG and first SSL_CTX
    # 3.3 -> 2.2 ms; the first handshake 2.4-2.9 -> 2.1-2.3 ms).
    step openssl-configure ./Configure linux-x86_64 no-shared no-module no-dso no-engine no-tests \
      no-aria no-bf no-blake2 no-camellia no-cast no-des no-gost no-idea no-md4 no-mdc2 no-ocb \
      no-rc2 no-rc4 no-rc5 no-rmd160 no-scrypt no-seed no-siphash no-siv no-sm2 no-sm3 \
      no-whirlpool no-dh no-dsa no-ec2m no-ssl3 no-tls1 no-tls1_1 no-dtls no-dgram no-srp no-psk \
      no-srtp no-ct no-ts no-cmp no-comp no-legacy no-ui-console \
      --prefix="$prefix" --libdir=lib --openssldir=/usr/lib/ssl
    step openssl-build make -j"$jobs" build_libs
    step openssl-install make install_dev
  }
  devmapper_() {
    d=$(fetch lvm2) && cd "$d" || exit 1
    step lvm2-configure ./configure --prefix="$prefix" --enable-static_link --disable-selinux \
      --disable-udev_sync --disable-udev-systemd-background-jobs --disable-blkid_wiping \
      --disable-readline --disable-nls
    step libdevmapper-build make -j"$jobs" -C libdm
    step libdevmapper-install make -C libdm install_include install_static install_pkgconfig
  }
  cryptsetup_() {
    d=$(fetch cryptsetup) && cd "$d" || exit 1
    step cryptsetup-patch patch -p1 --forward -i "$root/scripts/patches/cryptsetup-af-one-hash-context.patch"
    step cryptsetup-autogen ./autogen.sh
    step cryptsetup-configure ./configure --prefix="$prefix" --disable-shared --enable-static \
      --with-crypto_backend=gcrypt --disable-ssh-token --disable-external-tokens --disable-asciidoc \
      --disable-nls --disable-selinux --disable-udev --disable-cryptsetup --disable-veritysetup \
      --disable-integritysetup
    step libcryptsetup-build make -j"$jobs" libcryptsetup.la
    step libcryptsetup-install make install-libLTLIBRARIES install-includeHEADERS install-pkgconfigDATA
  }
  curl_() {
    d=$(fetch curl) && cd "$d" || exit 1
    step curl-configure ./configure --prefix="$prefix" --disable-shared --enable-static \
      --with-openssl="$prefix" --enable-threaded-resolver --without-libidn2 --without-libpsl \
      --without-nghttp2 --without-nghttp3 --without-ngtcp2 --without-brotli --without-zstd --without-zlib \
      --without-librtmp --without-libssh2 --without-libssh --without-gssapi --disable-ldap --disable-ldaps \
      --disable-rtsp --disable-dict --disable-telnet --disable-tftp --disable-pop3 --disable-imap \
      --disable-smb --disable-smtp --disable-gopher --disable-mqtt --disable-ftp --disable-file \
      --disable-manual --disable-ntlm --disable-ntlm-wb --disable-alt-svc --disable-hsts --disable-cookies \
      --disable-netrc --disable-progress-meter --disable-unix-sockets --without-ca-bundle \
      --without-ca-path --without-ca-fallback
    step libcurl-build make -j"$jobs" -C lib
    step libcurl-install sh -c 'make -C lib install && make -C include install && make install-pkgconfigDATA'
  }
  jsoncpp_() {
    d=$(fetch libjsoncpp) || exit 1
    step jsoncpp-configure cmake -S "$d" -B "$d/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_INSTALL_PREFIX="$prefix" -DCMAKE_INSTALL_LIBDIR=lib -DBUILD_SHARED_LIBS=OFF \
      -DBUILD_STATIC_LIBS=ON -DBUILD_OBJECT_LIBS=OFF -DJSONCPP_WITH_TESTS=OFF \
      -DJSONCPP_WITH_POST_BUILD_UNITTEST=OFF -DJSONCPP_WITH_EXAMPLE=OFF -DJSONCPP_WITH_CMAKE_PACKAGE=OFF
    step jsoncpp-build cmake --build "$d/build" -j"$jobs"
    step jsoncpp-install cmake --install "$d/build"
  }
  tss_() {
    step tpm2-tss-fetch curl -fsS -o "$src/$tss_tarball" "$tss_url"
    echo "$tss_sha256  $src/$tss_tarball" | sha256sum -c --quiet - || die "$tss_tarball: SHA-256 mismatch"
    rm -rf "$src/tpm2-tss-$tss_version"
    tar -xzf "$src/$tss_tarball" -C "$src" && cd "$src/tpm2-tss-$tss_version" || exit 1
    # A tarball made from git: bootstrap takes the version from git, which is
    # not there; it is given instead.
    echo "$tss_version" >VERSION
    step tpm2-tss-bootstrap sh -c "sed '/git describe/d' bootstrap | sh -e"
    step tpm2-tss-configure ./configure --prefix="$prefix" --disable-shared --enable-static \
      --with-crypto=ossl --disable-fapi --disable-policy --enable-nodl --disable-doxygen-doc \
      --disable-tcti-mssim --disable-tcti-pcap --disable-tcti-libtpms --disable-tcti-cmd \
      --disable-tcti-spi-helper --disable-tcti-spi-ltt2go --disable-tcti-spidev --disable-tcti-spi-ftdi \
      --disable-tcti-i2c-helper --disable-tcti-i2c-ftdi --with-udevrulesdir="$prefix/lib/udev" \
      --with-runstatedir="$prefix/run" --with-sysusersdir="$prefix/lib/sysusers.d" \
      --with-tmpfilesdir="$prefix/lib/tmpfiles.d"
    step tpm2-tss-build make -j"$jobs"
    step tpm2-tss-install make install
    # Every TCTI defines Tss2_Tcti_Info, the entry point for loading it with
    # dlopen; linked in together they clash. keygate calls each TCTI's init
    # function directly, so the symbol is made local to its archive.
    for t in device swtpm; do
      step "tpm2-tss-localize-$t" objcopy --localize-symbol=Tss2_Tcti_Info "$prefix/lib/libtss2-tcti-$t.a"
    done
  }

  build openssl openssl_     # first: the others are built against it
  build devmapper devmapper_
  build cryptsetup cryptsetup_
  build curl curl_
  build jsoncpp jsoncpp_
  build tpm2-tss tss_

  touch "$prefix/.complete"
  rm -rf "$src"
  say "libraries: done"
fi

# --- keygate -----------------------------------------------------------------
say "keygate: static build in $build"
# A build folder configured against another prefix caches its paths: start over.
if [ -f "$build/CMakeCache.txt" ] && [ "$(cat "$build/.deps-prefix" 2>/dev/null)" != "$prefix" ]; then
  rm -rf "$build"
fi
mkdir -p "$build"
echo "$prefix" >"$build/.deps-prefix"
PKG_CONFIG_PATH=$prefix/lib/pkgconfig cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DKEYGATE_STATIC=ON -DOPENSSL_ROOT_DIR="$prefix" >"$build.cmake.log" 2>&1 \
  || { cat "$build.cmake.log" >&2; die "cmake failed"; }
rm -f "$build.cmake.log"
# The linker's notes that getaddrinfo and dlopen in a static program need the
# matching glibc at run time are expected: host names resolve through glibc's
# built-in files and dns sources; only another nsswitch.conf source would be
# loaded from the system's glibc.
if ! cmake --build "$build" -j"$jobs" --target keygate >"$build/build.log" 2>&1; then
  grep -v -E "warning: Using '(dlopen|getaddrinfo|gethostbyname)'" "$build/build.log" | tail -n 40 >&2
  die "keygate did not build (log: $build/build.log)"
fi
file -b "$build/bin/keygate" | grep -q 'static-pie linked' || die "keygate is not static: $(file -b "$build/bin/keygate")"
dist=$build/dist
mkdir -p "$dist"
objcopy --only-keep-debug "$build/bin/keygate" "$dist/keygate.debug"
objcopy --strip-all --add-gnu-debuglink="$dist/keygate.debug" "$build/bin/keygate" "$dist/keygate"
say "keygate: $dist/keygate ($(du -h "$dist/keygate" | cut -f1), static-pie; symbols in keygate.debug)"
