# Shared by the QEMU end-to-end tests (sourced, bash).

# Sets root, build, bin, cache and a fresh work folder BUILD_DIR/NAME, and
# kills the background processes listed in pids when the script exits.
# Usage: e2e_begin NAME BUILD_DIR
e2e_begin() {
  root=$(cd "$here/../.." && pwd)
  build=$(cd "$2" && pwd)
  bin=$build/bin
  work=$build/$1
  cache=$build/e2e-cache
  rm -rf "$work"
  mkdir -p "$work" "$cache"
  pids=()
  trap e2e_cleanup EXIT
}
e2e_cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }

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

# Starts the metadata emulator (AWS, one instance) and the key server on
# 127.0.0.1, state in WORK; the server's certificate also names
# 169.254.169.253, where guests reach it. Appends both to pids; sets
# emu_port and srv_port. Usage: e2e_start_servers WORK ACCOUNT REGION INSTANCE IMAGE
# [SERVER OPTION ...]
e2e_start_servers() {
  local work=$1
  "$bin/keygate-metadata-emulator" init --state-dir "$work/emu" --region "$3" >/dev/null
  "$bin/keygate-metadata-emulator" serve --state-dir "$work/emu" --listen 127.0.0.1:0 \
    --port-file "$work/emu.port" --account "$2" --region "$3" \
    --instance-id "$4" --image-id "$5" 2>"$work/emu.log" &
  pids+=($!)
  "$bin/keygate-server" serve --state-dir "$work/srv" --listen 127.0.0.1:0 --port-file "$work/srv.port" \
    --aws-trust-dir "$work/emu/aws-trust" --tls-san IP:169.254.169.253 "${@:6}" 2>"$work/srv.log" &
  pids+=($!)
  emu_port=$(e2e_wait_port "$work/emu.port")
  srv_port=$(e2e_wait_port "$work/srv.port")
}
