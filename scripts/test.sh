#!/usr/bin/env bash
# Builds keygate and runs every test: unit and integration tests in a normal
# build, the end-to-end QEMU boot test, then unit and integration tests again
# with AddressSanitizer + UndefinedBehaviorSanitizer. Installs what it needs
# first. KEYGATE_SKIP_E2E=1 / KEYGATE_SKIP_SANITIZERS=1 skip those parts.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
jobs=$(nproc)

echo "== build (RelWithDebInfo)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$jobs"
echo "== test (RelWithDebInfo)"
(cd build && ctest --output-on-failure -j 2)

if [ "${KEYGATE_SKIP_E2E:-0}" != 1 ]; then
  echo "== end-to-end boot test (QEMU, TCG)"
  tests/e2e/boot_test.sh build
fi

if [ "${KEYGATE_SKIP_SANITIZERS:-0}" != 1 ]; then
  echo "== build (ASan + UBSan)"
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DKEYGATE_SANITIZE=ON >/dev/null
  cmake --build build-asan -j "$jobs"
  echo "== test (ASan + UBSan)"
  (cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
     UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j 2)
fi
