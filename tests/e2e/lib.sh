# Shared by the QEMU end-to-end tests (sourced, bash).

say() { printf '\n== e2e: %s\n' "$*"; }
fail() { printf 'e2e: FAILED: %s\n' "$*" >&2; exit 1; }

# Debian's kernel package, downloaded into CACHE and unpacked there (nothing
# installed on the host). Sets kver and kroot.
e2e_fetch_kernel() {
  local cache=$1 kpkg deb
  kpkg=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1)
  [ -n "$kpkg" ] || fail "cannot find Debian's kernel package"
  kver=${kpkg#linux-image-}
  deb=$(ls "$cache"/"$kpkg"_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    (cd "$cache" && apt-get download "$kpkg" >/dev/null 2>&1) || fail "apt-get download $kpkg"
    deb=$(ls "$cache"/"$kpkg"_*.deb | head -1)
  fi
  kroot=$cache/kroot-$kver
  if [ ! -e "$kroot/lib/modules/$kver/modules.dep" ]; then
    rm -rf "$kroot"
    dpkg-deb -x "$deb" "$kroot"
    depmod -b "$kroot" "$kver"
  fi
  echo "kernel $kver"
}

# Waits for a server's port file; prints the port.
e2e_wait_port() {
  for _ in $(seq 100); do [ -s "$1" ] && { cat "$1"; return; }; sleep 0.1; done
  fail "no port in $1"
}
