#!/usr/bin/env bash
# Builds keygate and runs every test: unit and integration tests in a
# normal build, the integration suite twice (SQLite, then every server on a
# PostgreSQL database in a throwaway cluster the run starts and stops); the unlocker's paths under valgrind (tests/valgrind/run.sh);
# the static release build of the unlocker (scripts/build-release.sh) and
# the integration tests again against it; a short run of each fuzz target
# (tests/fuzz/run.sh); the end-to-end QEMU boot test (the release unlocker
# in the initramfs) and cloud-init test; then unit and integration tests
# again with AddressSanitizer + UndefinedBehaviorSanitizer. Installs what it
# needs first. KEYGATE_SKIP_RELEASE=1 / KEYGATE_SKIP_E2E=1 /
# KEYGATE_SKIP_SANITIZERS=1 / KEYGATE_SKIP_FUZZ=1 skip those parts.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
jobs=$(nproc)

echo "== build (RelWithDebInfo)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$jobs"
echo "== test (RelWithDebInfo)"
(cd build && ctest --output-on-failure -j 2)
echo "console screenshots (the console test): build/test-artifacts/console-*.png"

echo "== the unlocker under valgrind memcheck"
tests/valgrind/run.sh build

echo "== install layout (DESTDIR)"
rm -rf build/install-root
DESTDIR="$PWD/build/install-root" cmake --install build >/dev/null
plugin_dir=$(pkg-config --variable=libdir libcryptsetup)/cryptsetup
for f in usr/local/sbin/keygate usr/local/bin/keygate-server \
         usr/local/share/keygate/trust/aws/rsa2048/us-east-1.pem \
         usr/local/share/keygate/keygate-unlock-volumes usr/local/lib/keygate/keygate-keyscript \
         usr/local/lib/systemd/system/keygate-volumes.service \
         usr/share/initramfs-tools/hooks/keygate usr/share/initramfs-tools/scripts/init-premount/keygate \
         usr/lib/dracut/modules.d/90keygate/module-setup.sh \
         usr/lib/python3/dist-packages/cc_keygate.py usr/lib/python3/dist-packages/keygate_cloud_schema.py etc/cloud/cloud.cfg.d/90_keygate.cfg \
         usr/local/bin/keygate-cloud-config \
         "${plugin_dir#/}/libcryptsetup-token-keygate.so"; do
  [ -e "build/install-root/$f" ] || { echo "install layout: missing $f" >&2; exit 1; }
done
# The installed server finds its shipped trust store relative to itself.
build/install-root/usr/local/bin/keygate-server serve --state-dir build/install-root/state \
  --listen 127.0.0.1:0 --port-file build/install-root/port 2>build/install-root/server.log &
server_pid=$!
for _ in $(seq 100); do [ -s build/install-root/port ] && break; sleep 0.1; done
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
grep -q "for 36 regions" build/install-root/server.log ||
  { cat build/install-root/server.log >&2; echo "install layout: server did not load its trust store" >&2; exit 1; }
echo "install layout: ok"

unlocker=
if [ "${KEYGATE_SKIP_RELEASE:-0}" != 1 ]; then
  echo "== release build: static keygate (libraries from Debian's sources, cached)"
  ./scripts/build-release.sh "$PWD/build-release"
  unlocker=$PWD/build-release/dist/keygate
  echo "== integration tests against the release keygate"
  (cd build && KEYGATE_UNLOCKER="$unlocker" ctest --output-on-failure -j 2 -L '^integration$')
fi

if [ "${KEYGATE_SKIP_FUZZ:-0}" != 1 ]; then
  echo "== fuzz: every parser of untrusted bytes, 45 s each (libFuzzer, ASan, UBSan)"
  tests/fuzz/run.sh --seconds 45
fi

if [ "${KEYGATE_SKIP_E2E:-0}" != 1 ]; then
  echo "== end-to-end boot test (QEMU, TCG)"
  KEYGATE_UNLOCKER="$unlocker" tests/e2e/boot_test.sh build
  echo "== end-to-end cloud-init test (debootstrap image, QEMU, TCG)"
  tests/e2e/cloudinit_test.sh build
fi

if [ "${KEYGATE_SKIP_SANITIZERS:-0}" != 1 ]; then
  echo "== build (ASan + UBSan)"
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DKEYGATE_SANITIZE=ON >/dev/null
  cmake --build build-asan -j "$jobs"
  echo "== test (ASan + UBSan)"
  # The integration suite's PostgreSQL pass ran in the first build; here the
  # PostgreSQL store runs under the sanitizers through its contract and
  # replica tests.
  (cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
     UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j 2 -LE integration-postgres)
fi
