#!/usr/bin/env bash
# Installs everything keygate needs to build, test and run its quickstart on
# Debian 12. Run as root. Safe to run again.
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  libssl-dev libcryptsetup-dev libblkid-dev libcurl4-openssl-dev libjsoncpp-dev
  libsqlite3-dev libgtest-dev libgmock-dev
  # the PostgreSQL store (libpq) and the server its tests start (initdb and
  # pg_ctl in a throwaway cluster under the test's own folder)
  libpq-dev postgresql
  # the server's HTTPS front (Boost.Beast and Asio, headers only); cpp-httplib
  # for the metadata emulator and the tests' clients
  libboost1.81-dev libcpp-httplib-dev
  # vTPM: TPM2-TSS (ESAPI, device and swtpm TCTIs), tpm2-tools for tests
  libtss2-dev tpm2-tools
  # the cloud-init module and its tests (Debian's cloud-init, its Python)
  cloud-init python3-yaml
  # the operators' view tests: the console in Debian's headless Chromium
  # (its NSS database made with certutil and pk12util), and Prometheus's
  # promtool to check /metrics
  chromium libnss3-tools prometheus
  # the fuzz targets (libFuzzer, tests/fuzz)
  clang libclang-rt-14-dev
  # the unlocker under memcheck (tests/valgrind) and the core-dump test
  # (gdb's gcore)
  valgrind gdb
  cryptsetup-bin e2fsprogs openssl curl ca-certificates
  # the state-file crash test kills the server at every write, fsync and
  # rename of its first start (strace's fault injection)
  strace
  # end-to-end boot test: Debian's kernel under QEMU with a real initramfs
  qemu-system-x86 initramfs-tools cryptsetup-initramfs busybox kmod cpio zstd
  swtpm swtpm-tools python3
  # the dracut image (systemd initrd with systemd-networkd) in the same test
  dracut-core dracut-network systemd dbus-daemon
  # the cloud-init boot test: a debootstrap image and a NoCloud seed disk
  debootstrap dosfstools mtools
  # the static release build (scripts/build-release.sh): its libraries are
  # built from Debian's source packages (TPM2-TSS's bootstrap needs libltdl's
  # autoconf macros); scripts/fresh-check.sh proves this list on a new root
  dpkg-dev autoconf automake autoconf-archive autopoint libtool libltdl-dev gettext libpopt-dev
  uuid-dev libjson-c-dev file binutils
)
# Reference tools for bench/ (clevis + tang on the same machine; clevis's
# tpm2 pin and systemd units for bench/initramfs_size.sh, which downloads
# clevis-initramfs and clevis-dracut without installing them; nginx as the
# boot-storm bench's TLS-only floor).
bench_packages=(clevis clevis-luks clevis-tpm2 clevis-systemd tang socat jose systemd nginx-light)

missing=()
for p in "${packages[@]}" ${KEYGATE_WITH_BENCH:+"${bench_packages[@]}"}; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup: all packages present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup: need root to install: ${missing[*]}" >&2
  exit 1
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
