#!/usr/bin/env bash
# What keygate costs an initramfs, beside what clevis costs, in one run.
#
# Builds initramfs images for Debian's kernel (the linux-image package,
# unpacked, as the QEMU boot test does) with initramfs-tools (mkinitramfs,
# MODULES=most, zstd) and with dracut (no-hostonly, zstd), each three times
# on the same kernel with the same compression:
#   baseline   an encrypted root with the passphrase prompt only (cryptroot /
#              dracut's crypt module)
#   + keygate  keygate's hook or dracut module with the static release
#              keygate (scripts/build-release.sh)
#   + clevis   Debian's clevis-initramfs or clevis-dracut, with clevis's tang
#              and tpm2 pins present (clevis-tpm2 installed)
# and prints one table: the stripped size of the release keygate, each
# image's size and what keygate and clevis add to the baseline.
#
# clevis-initramfs and clevis-dracut are downloaded and unpacked, not
# installed (their hooks would join every image made on this machine); the
# hook folders each image sees are private copies, bind-mounted in a mount
# namespace of their own, so whatever is installed on the machine does not
# leak into the baseline. Needs root.
#
# Usage: bench/initramfs_size.sh   (KEYGATE_RELEASE_BUILD=dir: the release
#        build, made if missing)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"
release=${KEYGATE_RELEASE_BUILD:-$root/build-release}
[ "$(id -u)" -eq 0 ] || { echo "initramfs_size: needs root (mount namespaces)" >&2; exit 1; }

KEYGATE_WITH_BENCH=1 ./scripts/setup.sh >/dev/null
[ -x "$release/dist/keygate" ] || ./scripts/build-release.sh "$release" >&2
keygate=$release/dist/keygate

# tests/e2e/lib.sh: Debian's kernel, unpacked into a cache (nothing installed).
. "$root/tests/e2e/lib.sh"
work=$(mktemp -d /tmp/keygate-initramfs-size-XXXXXX)
trap 'rm -rf "$work"' EXIT
cache=${KEYGATE_E2E_CACHE:-$root/build/e2e-cache}
mkdir -p "$cache"
e2e_fetch_kernel "$cache" >/dev/null

(cd "$work" && apt-get download clevis-initramfs clevis-dracut >"$work/download.log" 2>&1) ||
  { cat "$work/download.log" >&2; fail "apt-get download clevis-initramfs clevis-dracut"; }
for deb in "$work"/clevis-initramfs_*.deb "$work"/clevis-dracut_*.deb; do
  dpkg-deb -x "$deb" "$work/clevis"
done
clevis_version=$(dpkg-deb -f "$work"/clevis-initramfs_*.deb Version)

# An encrypted root in crypttab (the device need not exist: `initramfs`
# makes cryptroot include it), and a keygate configuration for it.
printf 'cryptroot UUID=%s none luks,initramfs\n' "$(cat /proc/sys/kernel/random/uuid)" >"$work/crypttab"
printf 'KEYGATE_VOLUMES="cryptroot=UUID=%s"\n' "$(cat /proc/sys/kernel/random/uuid)" >"$work/keygate.conf"
mkdir -p /lib/modules /boot /etc/cryptsetup-initramfs "$work/conf"
[ -e /etc/cryptsetup-initramfs/conf-hook ] || touch /etc/cryptsetup-initramfs/conf-hook
: >"$work/conf-hook"
printf 'MODULES=most\nBUSYBOX=auto\nCOMPRESS=zstd\n' >"$work/conf/initramfs.conf"

# Hook folders for each variant: the machine's, less any keygate or clevis
# files, plus the variant's own.
clean_copy() {  # source folder, destination
  cp -a "$1" "$2"
  find "$2" -mindepth 1 \( -name '*keygate*' -o -name '*clevis*' \) -prune -exec rm -rf {} +
}
for v in base keygate clevis; do
  clean_copy /usr/share/initramfs-tools "$work/itools-$v"
  clean_copy /usr/lib/dracut/modules.d "$work/dracut-$v"
done
install -D -m 0755 initramfs/initramfs-tools/hooks/keygate "$work/itools-keygate/hooks/keygate"
install -D -m 0755 initramfs/initramfs-tools/scripts/init-premount/keygate \
  "$work/itools-keygate/scripts/init-premount/keygate"
cp -a "$work/clevis/usr/share/initramfs-tools/." "$work/itools-clevis/"
cp -a initramfs/dracut/90keygate "$work/dracut-keygate/"
cp -a "$work/clevis/usr/lib/dracut/modules.d/." "$work/dracut-clevis/"

mkinitramfs_image() {  # variant, output
  local conf=/nonexistent
  [ "$1" = keygate ] && conf=$work/keygate.conf
  unshare -m sh -c "
    mount --bind '$work/itools-$1' /usr/share/initramfs-tools &&
    mount --bind '$work/crypttab' /etc/crypttab &&
    mount --bind '$work/conf-hook' /etc/cryptsetup-initramfs/conf-hook &&
    mount --bind '$kroot/lib/modules' /lib/modules &&
    mount --bind '$kroot/boot' /boot &&
    KEYGATE_BIN='$keygate' KEYGATE_INITRAMFS_CONF='$conf' KEYGATE_SCRIPTS='$root/initramfs' \
      mkinitramfs -d '$work/conf' -o '$2' '$kver'" >"$work/mkinitramfs-$1.log" 2>&1 ||
    { tail -n 20 "$work/mkinitramfs-$1.log" >&2; fail "mkinitramfs ($1)"; }
}
dracut_image() {  # variant, output
  local conf=/nonexistent add=(--add crypt)
  case "$1" in
    keygate) conf=$work/keygate.conf; add+=(--add keygate) ;;
    clevis) add+=(--add "clevis clevis-pin-tang clevis-pin-tpm2") ;;
  esac
  unshare -m sh -c "
    mount --bind '$work/dracut-$1' /usr/lib/dracut/modules.d &&
    KEYGATE_BIN='$keygate' KEYGATE_INITRAMFS_CONF='$conf' KEYGATE_SCRIPTS='$root/initramfs' \
      dracut --force --quiet --no-hostonly --zstd --kver '$kver' --kmoddir '$kroot/lib/modules/$kver' \
        --omit plymouth ${add[*]@Q} --include '$work/crypttab' /etc/crypttab '$2'" \
    >"$work/dracut-$1.log" 2>&1 ||
    { tail -n 20 "$work/dracut-$1.log" >&2; fail "dracut ($1)"; }
}
# What each image holds of the tool measured, so a silently skipped hook
# cannot pass for a small one.
must_hold() {  # image, listing command, path pattern, what
  # grep reads the whole listing (grep -q would end the lister early, and
  # pipefail would count its SIGPIPE as a miss).
  "$2" "$1" 2>/dev/null | grep -E "$3" >/dev/null || fail "$4 missing from $(basename "$1")"
}
list_itools() { lsinitramfs "$1"; }
# Paths only (lsinitrd lists in `ls -l` form, which the comparison cannot use).
list_dracut() { /usr/lib/dracut/skipcpio "$1" | zstd -dcq | cpio -t --quiet; }

for v in base keygate clevis; do
  echo "initramfs_size: mkinitramfs ($v)" >&2
  mkinitramfs_image "$v" "$work/itools-$v.img"
  echo "initramfs_size: dracut ($v)" >&2
  dracut_image "$v" "$work/dracut-$v.img"
done
must_hold "$work/itools-keygate.img" list_itools 'sbin/keygate$' "keygate"
must_hold "$work/dracut-keygate.img" list_dracut 'usr/sbin/keygate$' "keygate"
must_hold "$work/itools-clevis.img" list_itools 'clevis-decrypt-tpm2$' "clevis's tpm2 pin"
must_hold "$work/itools-clevis.img" list_itools 'clevis-decrypt-tang$' "clevis's tang pin"
must_hold "$work/dracut-clevis.img" list_dracut 'clevis-decrypt-tpm2$' "clevis's tpm2 pin"
must_hold "$work/dracut-clevis.img" list_dracut 'clevis-decrypt-tang$' "clevis's tang pin"
# Files each tool adds; the static keygate brings no shared library.
added() {  # lister, variant image, base image -> file list
  comm -13 <("$1" "$3" 2>/dev/null | sed 's|^\./||; s|^usr/||' | sort -u) \
           <("$1" "$2" 2>/dev/null | sed 's|^\./||; s|^usr/||' | sort -u)
}
for flavour in itools dracut; do
  for v in keygate clevis; do
    added "list_$flavour" "$work/$flavour-$v.img" "$work/$flavour-base.img" >"$work/added-$flavour-$v"
  done
  if grep -E '\.so(\.|$)' "$work/added-$flavour-keygate"; then
    fail "the static keygate brought shared libraries into the $flavour image (above)"
  fi
done

size() { stat -c %s "$1"; }
mb() { awk -v b="$1" 'BEGIN { printf "%.2f MB", b / 1e6 }'; }
grow() { awk -v a="$1" -v b="$2" 'BEGIN { printf "+%.2f MB (+%.1f%%)", (a - b) / 1e6, 100 * (a - b) / b }'; }
ratio() { awk -v k="$1" -v c="$2" -v b="$3" 'BEGIN { printf "%.3f", (k - b) / (c - b) }'; }
# The target: keygate adds less than a third of what clevis adds.
target() { awk -v k="$1" -v c="$2" -v b="$3" 'BEGIN { print (3 * (k - b) < (c - b)) ? "holds" : "MISSED" }'; }
ib=$(size "$work/itools-base.img") ik=$(size "$work/itools-keygate.img") ic=$(size "$work/itools-clevis.img")
db=$(size "$work/dracut-base.img") dk=$(size "$work/dracut-keygate.img") dc=$(size "$work/dracut-clevis.img")
kb=$(size "$keygate")

echo
echo "initramfs size, Debian kernel $kver, zstd; keygate release build, clevis $clevis_version"
printf '%-44s %26s %26s\n' "" "initramfs-tools" "dracut"
printf '%-44s %26s %26s\n' "" "(MODULES=most)" "(no-hostonly)"
printf '%-44s %26s %26s\n' "baseline: encrypted root, passphrase only" "$(mb "$ib")" "$(mb "$db")"
printf '%-44s %26s %26s\n' "+ keygate (hook / module)" "$(grow "$ik" "$ib")" "$(grow "$dk" "$db")"
printf '%-44s %26s %26s\n' "+ clevis (tang and tpm2 pins)" "$(grow "$ic" "$ib")" "$(grow "$dc" "$db")"
printf '%-44s %26s %26s\n' "keygate's growth / clevis's growth" "$(ratio "$ik" "$ic" "$ib")" "$(ratio "$dk" "$dc" "$db")"
printf '%-44s %26s %26s\n' "target: under 1/3" "$(target "$ik" "$ic" "$ib")" "$(target "$dk" "$dc" "$db")"
printf '%-44s %26s %26s\n' "files added: keygate / clevis" \
  "$(wc -l <"$work/added-itools-keygate") / $(wc -l <"$work/added-itools-clevis")" \
  "$(wc -l <"$work/added-dracut-keygate") / $(wc -l <"$work/added-dracut-clevis")"
echo
printf 'release keygate, stripped: %d bytes (%.2f MiB); zstd -19 of it: %d bytes\n' "$kb" \
  "$(awk -v b="$kb" 'BEGIN { print b / 1048576 }')" "$(zstd -19 -q -c "$keygate" | wc -c)"
for flavour in itools dracut; do
  echo "files keygate adds ($flavour): $(tr '\n' ' ' <"$work/added-$flavour-keygate")"
done
