#!/usr/bin/env bash
# Fresh-machine check: does a new Debian 12 machine get through the project's
# own install steps? Makes a minimal Debian 12 root with debootstrap from the
# archive this machine's apt uses, puts a clean copy of the checkout in it
# (the files git tracks, and untracked ones it does not ignore; no build
# folders, no caches), and runs scripts/setup.sh and then the release build
# with an empty library cache inside it, the normal build's configure, the
# tests' throwaway PostgreSQL cluster, and the console test's headless
# Chromium and promtool. A package that setup.sh forgets, and
# that this machine happens to have, fails here.
#
# A pass is recorded as a stamp keyed by what it checked (setup.sh and the
# release build's library cache key); a later run with the same inputs says so
# and stops, unless --force. .ci/run calls it on every run, so it runs again the
# day either input changes.
#
# Usage: scripts/fresh-check.sh [--force] [--full]
#   --full   run the README's test command (scripts/test.sh) in the fresh
#            root too, not only setup and the release build (about 40 minutes)
# Environment: KEYGATE_FRESH_DIR  where the root is made (default
#              /var/tmp/keygate-fresh-root; removed afterwards),
#              KEYGATE_FRESH_STAMPS  where passes are recorded (default
#              /var/cache/keygate/fresh-check). Needs root.
set -euo pipefail
self=$(readlink -f "$0")
cd "$(dirname "$self")/.."
root=$(pwd)
force=0 full=0
for a in "$@"; do
  case "$a" in
    --force) force=1 ;;
    --full) full=1 ;;
    *) echo "usage: $0 [--force] [--full]" >&2; exit 2 ;;
  esac
done
say() { echo "fresh-check: $*"; }
die() { echo "fresh-check: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts)"

./scripts/setup.sh >/dev/null  # debootstrap, and what the key computation reads
lib_key=$(./scripts/build-release.sh --print-key) || die "cannot compute the release build's cache key"
key=$( { sha256sum scripts/setup.sh | cut -d' ' -f1; echo "$lib_key full=$full"; } | sha256sum | cut -c1-16)
stamps=${KEYGATE_FRESH_STAMPS:-/var/cache/keygate/fresh-check}
stamp=$stamps/$key.pass
if [ "$force" = 0 ] && [ -f "$stamp" ]; then
  say "setup.sh and the library build (cache key $lib_key) passed on a fresh root before: $(head -n 1 "$stamp")"
  exit 0
fi

mirror=$(./scripts/debian-sources.sh mirror) || die "no Debian 12 archive configured"
sources=$(./scripts/debian-sources.sh deb)
dir=${KEYGATE_FRESH_DIR:-/var/tmp/keygate-fresh-root}
log=$stamps/$key.log
mkdir -p "$stamps"
: >"$log"

cleanup() {
  local m
  # Unmount whatever is mounted below the root, deepest first, before removing it.
  for m in $(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  if awk -v d="$dir/" 'index($2, d) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
    echo "fresh-check: mounts remain below $dir; not removing it" >&2
  else
    rm -rf --one-file-system "$dir"
  fi
}
trap cleanup EXIT
cleanup
t0=$SECONDS

say "debootstrap bookworm (minbase) from $mirror into $dir"
debootstrap --variant=minbase bookworm "$dir" "$mirror" >>"$log" 2>&1 ||
  { tail -n 20 "$log" >&2; die "debootstrap failed (log: $log)"; }
# apt in the root uses the same entries as this machine (security updates
# included), with the keyrings they name.
rm -f "$dir/etc/apt/sources.list"
printf '%s\n' "$sources" >"$dir/etc/apt/sources.list.d/debian.sources"
for k in $(sed -n 's/^Signed-By: *\(\/.*\)$/\1/p' <<<"$sources" | sort -u); do
  [ -e "$dir$k" ] || { mkdir -p "$(dirname "$dir$k")"; cp "$k" "$dir$k"; }
done
cp /etc/resolv.conf "$dir/etc/resolv.conf" 2>/dev/null || true
# Packages installed in the root start no services.
printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
chmod 0755 "$dir/usr/sbin/policy-rc.d"

mount -t proc proc "$dir/proc"
mount --rbind /sys "$dir/sys" && mount --make-rslave "$dir/sys"
mount --rbind /dev "$dir/dev" && mount --make-rslave "$dir/dev"

say "copying the checkout (tracked and unignored files only)"
mkdir -p "$dir/src/keygate"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$dir/src/keygate"

run() {  # description, command inside the root
  say "$1"
  if ! chroot "$dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
       /bin/bash -c "cd /src/keygate && $2" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "$1: failed (log: $log)"
  fi
}
run "scripts/setup.sh" "./scripts/setup.sh"
[ ! -e "$dir/var/cache/keygate/release-deps" ] || die "the fresh root has a library cache already"
run "release build, empty library cache" "./scripts/build-release.sh /src/keygate/build-release"
"$dir/src/keygate/build-release/dist/keygate" --version >>"$log" 2>&1 || die "the release keygate does not run (log: $log)"
# The normal build's configure finds every library it needs (the server's
# libpq among them), and the tests' PostgreSQL cluster starts and stops.
run "normal build: cmake configure" "cmake -S . -B /tmp/keygate-configure -DCMAKE_BUILD_TYPE=RelWithDebInfo"
run "the tests' PostgreSQL cluster" "tests/pg_cluster.sh start /tmp/pg && tests/pg_cluster.sh stop /tmp/pg"
# The console test's browser renders a page headless as root (as the test
# starts it), and the NSS and Prometheus tools it uses are there.
run "headless chromium, certutil, pk12util, promtool" \
  "chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
     --disable-component-update --disable-sync --user-data-dir=/tmp/chromium-check \
     --dump-dom file:///src/keygate/server/console/index.html 2>/dev/null | grep -q 'id=\"tab-audit\"' &&
   command -v certutil && command -v pk12util && promtool --version"
if [ "$full" = 1 ]; then
  run "scripts/test.sh (the README's test command)" "./scripts/test.sh"
fi

extra=
[ "$full" = 1 ] && extra=", with scripts/test.sh"
summary="$(date -u +%Y-%m-%dT%H:%MZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo none), library key $lib_key, $(( SECONDS - t0 )) s$extra"
echo "$summary" >"$stamp"
say "passed: $summary (log: $log)"
