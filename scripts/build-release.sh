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
#               TLS below 1.2, no DH/DSA, no GOST, no ChaCha20, no CMS/OCSP,
#               ...); P-256 from OpenSSL's constant-time C (ecp_nistp256)
#               rather than its assembly and 150 KB table (one patch);
#               OPENSSLDIR /usr/lib/ssl as Debian's (keygate itself reads no
#               openssl.cnf)
#   libdevmapper  (lvm2) no udev sync, no SELinux
#   libblkid, libuuid  (util-linux) the libraries only, for size: Debian's
#               libblkid.a is built without function sections or -Os
#   libcryptsetup OpenSSL backend (the same OpenSSL as TLS, so no second
#               crypto library: libgcrypt and libgpg-error were 0.8 MB of
#               the binary), LUKS2 reencryption, no external tokens. Two
#               patches (scripts/patches/): the anti-forensic merge hashes
#               all stripes with one context instead of fetching a digest
#               per block (4000 EVP_MD_fetch calls: about 3 ms of a 26 ms
#               unlock, measured), the backend works in OpenSSL's default
#               library context instead of setting up a second one (0.7 ms),
#               and FileVault2 metadata is not read (its regex parser is
#               70 KB of glibc; keygate opens LUKS2 only)
#   libcurl     HTTP and HTTPS only, OpenSSL, threaded resolver; no proxy (keygate
#               never uses one), no HTTP authentication (verbose strings stay:
#               they name why a connection failed)
#   jsoncpp     static; one patch (scripts/patches/jsoncpp-no-iostreams.patch):
#               no <iostream> and no string streams in the reader and value
#               code, so the static keygate links no iostreams or locale
#               facets at all (0.4 MB)
#   TPM2-TSS    ESAPI, MU, RC, the device and swtpm TCTIs; no FAPI. Debian 12's
#               3.2.1 source files are not on every mirror, so this takes the
#               4.1.3 upstream tarball from the archive's pool (Debian 13
#               ships it), through the mirror this machine's apt uses, pinned
#               by its SHA-256.
#
# Everything is compiled for size (-Os) with function and data sections, the C
# libraries without unwind tables; the linker drops what keygate never calls.
# bench/binary_size.sh prints where the remaining bytes go.
#
# The prefix is cached (KEYGATE_DEPS_DIR, default /var/cache/keygate/release-deps)
# under a key made of the library build steps below, the patches and the
# source versions; a fresh machine builds it once (about 5 minutes on 2 cores).
#
# Usage: scripts/build-release.sh [BUILD_DIR]     (default: build-release)
#        scripts/build-release.sh --print-key     the library cache key, and stop
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
# Sources come from the mirror this machine's own deb entries use
# (scripts/debian-sources.sh): a deb-src entry is added beside them when one of
# Debian 12's suites has no source index yet.
src_list=/etc/apt/sources.list.d/keygate-deb-src.sources
debian_indexes() {  # Packages|Sources -> "SUITE URI" of Debian 12's indexes of that kind
  apt-get indextargets --format '$(RELEASE) $(REPO_URI)' "Created-By: $1" 'Origin: Debian' 2>/dev/null |
    awk '$1 ~ /^bookworm(-updates|-security)?$/' | sort -u
}
if [ -n "$(comm -23 <(debian_indexes Packages) <(debian_indexes Sources))" ] ||
   [ -z "$(debian_indexes Sources)" ]; then
  [ "$(id -u)" -eq 0 ] || die "need root to add the deb-src entry ($src_list)"
  entries=$("$root/scripts/debian-sources.sh" deb-src) || die "no Debian 12 archive to take sources from"
  say "adding source indexes beside this machine's Debian 12 entries ($src_list)"
  printf '%s\n' "$entries" >"$src_list.tmp" && mv "$src_list.tmp" "$src_list"
  apt-get update -q || die "apt-get update failed after adding $src_list"
  [ -z "$(comm -23 <(debian_indexes Packages) <(debian_indexes Sources))" ] ||
    die "apt still lists no source index for: $(comm -23 <(debian_indexes Packages) <(debian_indexes Sources) | tr '\n' ' ')"
fi

# Debian 12's source versions of a package (bookworm, -updates, -security;
# not another release's or backports, should the machine list them), newest
# first: an older one is taken when the mirror no longer carries the newest's
# files.
candidates() {
  apt-cache madison "$1" |
    awk -F'|' '$3 ~ / bookworm(-updates|-security)?\/[^ ]* Sources *$/ { gsub(/ /, "", $2); print $2 }' |
    sort -rV | uniq
}

tss_version=4.1.3
tss_tarball=tpm2-tss_${tss_version}.orig.tar.gz
tss_sha256=8a389bda64690910e7af7deaf64703a3faed416dc538c9c3e4f893f24893524d
# From the pool of the archive this machine uses (Debian 13 ships this
# version); KEYGATE_TSS_TARBALL names a local copy instead.
tss_path=pool/main/t/tpm2-tss/$tss_tarball

key=$( { sed -n '/^# --- libraries/,/^# --- keygate/p' "$self" | sha256sum | cut -d' ' -f1
         for p in openssl lvm2 util-linux cryptsetup curl libjsoncpp; do echo "$p $(candidates "$p" | tr '\n' ' ')"; done
         echo "tpm2-tss $tss_version $tss_sha256"
         cat "$root"/scripts/patches/*.patch; } | sha256sum | cut -c1-16)
prefix=$deps/$key
if [ "$build" = --print-key ]; then echo "$key"; exit 0; fi

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
    local pkg=$1 v tried=()
    rm -rf "$src/$pkg"
    mkdir -p "$src/$pkg"
    for v in $(candidates "$pkg"); do
      tried+=("$v")
      if (cd "$src/$pkg" && apt-get source -q "$pkg=$v" >"$logs/fetch-$pkg.log" 2>&1); then
        find "$src/$pkg" -mindepth 1 -maxdepth 1 -type d | head -n 1
        return
      fi
    done
    [ -f "$logs/fetch-$pkg.log" ] && grep -E '^(E|W):' "$logs/fetch-$pkg.log" | tail -n 5 >&2
    if [ "${#tried[@]}" -eq 0 ]; then
      die "source package $pkg: apt lists no Debian 12 version of it (apt-cache madison $pkg); run apt-get update"
    fi
    die "source package $pkg: none of the versions apt lists could be fetched (tried ${tried[*]}). Run apt-get update; if this machine's mirror no longer serves those files, point apt at a mirror or a Debian snapshot archive that does"
  }
  export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
  # Size matters more than speed here except in the few hot paths, which are
  # assembly (SHA, AES, P-256): -Os, and sections the linker can drop. The C
  # libraries carry no unwind tables: nothing unwinds through them (no C++
  # exception crosses them, keygate cancels no thread), and gdb reads the
  # frame information of the debug file instead. That is 15 % of the binary.
  export CFLAGS="-Os -g -fstack-protector-strong -D_FORTIFY_SOURCE=2 -ffunction-sections -fdata-sections -fno-asynchronous-unwind-tables"
  cxxflags="-Os -g -fstack-protector-strong -D_FORTIFY_SOURCE=2 -ffunction-sections -fdata-sections"

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
    step openssl-patch patch -p1 --forward -i "$root/scripts/patches/openssl-ec-no-nistz256.patch"
    # Only what keygate uses (TLS 1.2/1.3 with ECDHE and AES-GCM, RSA and
    # ECDSA certificates; X25519, HKDF, AES-GCM, SHA-1/2, HMAC; RSA, ECC and
    # AES-CFB for TPM sessions; SHA-2, HMAC, PBKDF2 and AES-XTS for
    # libcryptsetup; SM4 stays, as TPM2-TSS links its SM4 session cipher
    # unconditionally): a smaller binary, and a smaller name map and method
    # store make OpenSSL's first-use setup cheaper (measured: library init,
    # DRBG and first SSL_CTX 3.3 -> 2.2 ms; the first handshake 2.4-2.9 ->
    # 2.1-2.3 ms). No ChaCha20-Poly1305 (TLS 1.3 keeps AES-GCM), no CMS,
    # OCSP, RFC 3779, multi-block CBC; no file names in error records. P-256
    # in constant-time C instead of assembly with a 150 KB table (patch).
    step openssl-configure ./Configure linux-x86_64 no-shared no-module no-dso no-engine no-tests \
      no-aria no-bf no-blake2 no-camellia no-cast no-des no-gost no-idea no-md4 no-mdc2 no-ocb \
      no-rc2 no-rc4 no-rc5 no-rmd160 no-scrypt no-seed no-siphash no-siv no-sm2 no-sm3 \
      no-whirlpool no-dh no-dsa no-ec2m no-ssl3 no-tls1 no-tls1_1 no-dtls no-dgram no-srp no-psk \
      no-srtp no-ct no-ts no-cmp no-comp no-legacy no-ui-console \
      no-chacha no-poly1305 no-cmac no-cms no-ocsp no-rfc3779 no-multiblock no-async \
      no-autoload-config no-filenames no-ssl-trace no-nextprotoneg enable-ec_nistp_64_gcc_128 \
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
  blkid_() {
    d=$(fetch util-linux) && cd "$d" || exit 1
    step util-linux-configure ./configure --prefix="$prefix" --disable-shared --enable-static \
      --disable-all-programs --enable-libblkid --enable-libuuid --disable-nls --without-udev \
      --without-systemd --without-python --disable-bash-completion --without-readline \
      --without-ncurses --without-ncursesw --without-tinfo --without-selinux --without-audit \
      --without-smack --without-cap-ng --without-btrfs --without-cryptsetup --disable-asciidoc \
      --disable-poman
    step libblkid-build make -j"$jobs" libblkid.la libuuid.la
    step libblkid-install make install-usrlib_execLTLIBRARIES install-nodist_blkidincHEADERS \
      install-uuidincHEADERS install-pkgconfigDATA
  }
  cryptsetup_() {
    d=$(fetch cryptsetup) && cd "$d" || exit 1
    for p in cryptsetup-af-one-hash-context cryptsetup-openssl-default-context \
             cryptsetup-no-fvault2-regex; do
      step "$p" patch -p1 --forward -i "$root/scripts/patches/$p.patch"
    done
    step cryptsetup-autogen ./autogen.sh
    step cryptsetup-configure ./configure --prefix="$prefix" --disable-shared --enable-static \
      --with-crypto_backend=openssl --disable-ssh-token --disable-external-tokens --disable-asciidoc \
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
      --without-ca-path --without-ca-fallback --disable-proxy --disable-http-auth --disable-mime \
      --disable-doh --disable-dateparse --disable-get-easy-options --disable-headers-api \
      --disable-websockets --disable-tls-srp --disable-libcurl-option
    step libcurl-build make -j"$jobs" -C lib
    step libcurl-install sh -c 'make -C lib install && make -C include install && make install-pkgconfigDATA'
  }
  jsoncpp_() {
    d=$(fetch libjsoncpp) || exit 1
    step jsoncpp-patch patch -d "$d" -p1 --forward -i "$root/scripts/patches/jsoncpp-no-iostreams.patch"
    step jsoncpp-configure cmake -S "$d" -B "$d/build" -DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_FLAGS="$cxxflags" \
      -DCMAKE_INSTALL_PREFIX="$prefix" -DCMAKE_INSTALL_LIBDIR=lib -DBUILD_SHARED_LIBS=OFF \
      -DBUILD_STATIC_LIBS=ON -DBUILD_OBJECT_LIBS=OFF -DJSONCPP_WITH_TESTS=OFF \
      -DJSONCPP_WITH_POST_BUILD_UNITTEST=OFF -DJSONCPP_WITH_EXAMPLE=OFF -DJSONCPP_WITH_CMAKE_PACKAGE=OFF
    step jsoncpp-build cmake --build "$d/build" -j"$jobs"
    step jsoncpp-install cmake --install "$d/build"
  }
  tss_() {
    if [ -n "${KEYGATE_TSS_TARBALL:-}" ]; then
      cp "$KEYGATE_TSS_TARBALL" "$src/$tss_tarball" || exit 1
    else
      local mirror
      mirror=$("$root/scripts/debian-sources.sh" mirror) || exit 1
      # apt's own downloader: the machine's proxy settings apply, and it checks the hash.
      if ! /usr/lib/apt/apt-helper download-file "$mirror/$tss_path" "$src/$tss_tarball" \
           "SHA256:$tss_sha256" >"$logs/tpm2-tss-fetch.log" 2>&1; then
        tail -n 5 "$logs/tpm2-tss-fetch.log" >&2
        die "tpm2-tss $tss_version: $mirror/$tss_path could not be fetched (tried version $tss_version, the only one pinned). Run apt-get update; if the mirror no longer has it, fetch $tss_tarball (SHA-256 $tss_sha256) by other means and set KEYGATE_TSS_TARBALL to its path"
      fi
    fi
    echo "$tss_sha256  $src/$tss_tarball" | sha256sum -c --quiet - ||
      die "$tss_tarball: SHA-256 is not the pinned $tss_sha256"
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
  build blkid blkid_         # before libcryptsetup, which probes with it
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
