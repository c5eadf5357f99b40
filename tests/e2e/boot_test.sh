#!/usr/bin/env bash
# End-to-end boot test: Debian's kernel under QEMU (TCG) with an initramfs
# made by mkinitramfs and keygate's initramfs-tools hook, a root disk
# encrypted in place and enrolled on the host, the key server and metadata
# emulator on the host's 127.0.0.1 reached through restricted user
# networking (guestfwd from link-local addresses), and swtpm as the vTPM.
#
#   initramfs-tools image (mkinitramfs + keygate's hook):
#   boot 1:  unattended unlock (dm-crypt), root mounted, its init prints a marker
#   boot 1a: a root whose policy wants a person's approval: the guest waits
#            and says so on the console, the test approves through the admin
#            API (mTLS, an approver's certificate), the root is mounted
#   boot 2:  volume revoked on the server: the passphrase prompt appears, the
#            test answers it on the serial console, the same marker appears
#   boot 3:  the same disk with a key file in the initramfs (timing baseline)
#   dracut image (systemd initrd + keygate's module):
#   boot 1t: token method: no keygate unit, systemd-cryptsetup opens the root
#            through keygate's LUKS2 token plugin
#   boot 1d: unattended, as boot 1
#   boot 2d: revoked, systemd's passphrase prompt answered, as boot 2
#
# Usage: tests/e2e/boot_test.sh BUILD_DIR
# KEYGATE_UNLOCKER=FILE puts that keygate binary into the initramfs images
# instead of BUILD_DIR's (scripts/test.sh: the static release build).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
e2e_begin e2e "${1:?usage: boot_test.sh BUILD_DIR}"

unlocker=${KEYGATE_UNLOCKER:-$bin/keygate}
echo "keygate in the initramfs images: $unlocker ($(file -b "$unlocker" | cut -d, -f1-2))"

say "kernel: Debian's linux-image, unpacked (nothing installed on the host)"
e2e_fetch_kernel "$cache"

say "root file system: a folder with a marker and an init that reports and powers off"
rootdir=$work/rootdir
mkdir -p "$rootdir"/{bin,sbin,proc,sys,dev,etc,lib64,lib/x86_64-linux-gnu}
cp /usr/bin/busybox "$rootdir/bin/busybox"
for lib in $(ldd /usr/bin/busybox | grep -o '/[^ ]*'); do
  cp -L "$lib" "$rootdir$lib"
done
echo "keygate e2e data written before encryption" >"$rootdir/etc/keygate-e2e-data"
# systemd (dracut's initrd) switches only into a root that looks like an OS.
printf 'ID=keygate-e2e\nNAME="keygate e2e root"\n' >"$rootdir/etc/os-release"
cat >"$rootdir/sbin/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "KEYGATE-E2E: root uptime $(/bin/busybox cut -d' ' -f1 /proc/uptime)"
echo "KEYGATE-E2E: root is $(/bin/busybox grep ' / ' /proc/mounts | /bin/busybox cut -d' ' -f1)"
echo "KEYGATE-E2E-ROOT-MOUNTED: $(/bin/busybox cat /etc/keygate-e2e-data)"
/bin/busybox sync
/bin/busybox poweroff -f
INIT
chmod +x "$rootdir/sbin/init"

say "key server (with a policy file) and metadata emulator on 127.0.0.1"
cat >"$work/policy.json" <<'POLICY'
{"policies": {"approve-boot": {"platform": "aws", "require": {"account_id": "210987654321"},
                               "approval": "manual", "approval_timeout": 600}}}
POLICY
e2e_start_servers "$work" 210987654321 eu-west-1 i-0e2e00000000000001 ami-0e2e000000000001 \
  --policy-file "$work/policy.json"
# People: alice (admin, from the state folder), bob (approver, through the API).
"$bin/keygate-server" admin bootstrap --state-dir "$work/srv" --name alice --out "$work/alice" \
  --server-url "https://127.0.0.1:$srv_port" >/dev/null
"$bin/keygate-server" admin cert issue --admin-dir "$work/alice" --name bob --role approver --out "$work/bob" >/dev/null

say "encrypt the root image in place and enroll it: keygate encrypt (image-group, from the host)"
img=$work/root.img
truncate -s 64M "$img"
mke2fs -q -F -t ext4 -b 4096 -d "$rootdir" "$img"
printf 'e2e recovery passphrase' >"$work/recovery.pass"
"$bin/keygate-server" token create --state-dir "$work/srv" --image-group --account 210987654321 \
  --region eu-west-1 --image-id ami-0e2e000000000001 >"$work/token"
"$bin/keygate" encrypt "$img" --recovery-passphrase-file "$work/recovery.pass" --no-evidence \
  --server "https://127.0.0.1:$srv_port" --token-server "https://169.254.169.253:8443" \
  --ca "$work/srv/ca.pem" --enrollment-token-file "$work/token" | tee "$work/enroll.out"
volume_id=$(sed -n 's/.*enrolled as volume \([0-9a-f-]*\).*/\1/p' "$work/enroll.out")
[ -n "$volume_id" ] || fail "encryption and enrollment"
if grep -q "keygate e2e data written" "$img"; then fail "plaintext still in the image"; fi
uuid=$(cryptsetup luksUUID "$img")
echo "LUKS2 UUID $uuid"

say "a second root image under the approval policy (alice's token; the same LUKS2 UUID, so the same initramfs opens it)"
img_approval=$work/root-approval.img
truncate -s 64M "$img_approval"
mke2fs -q -F -t ext4 -b 4096 -d "$rootdir" "$img_approval"
"$bin/keygate-server" admin token create --admin-dir "$work/alice" --policy approve-boot --image-group \
  --account 210987654321 --region eu-west-1 --image-id ami-0e2e000000000001 >"$work/token-approval"
"$bin/keygate" encrypt "$img_approval" --recovery-passphrase-file "$work/recovery.pass" --no-evidence \
  --server "https://127.0.0.1:$srv_port" --token-server "https://169.254.169.253:8443" \
  --ca "$work/srv/ca.pem" --enrollment-token-file "$work/token-approval" | tee "$work/enroll-approval.out"
approval_volume=$(sed -n 's/.*enrolled as volume \([0-9a-f-]*\).*/\1/p' "$work/enroll-approval.out")
[ -n "$approval_volume" ] || fail "encryption and enrollment of the approval image"
cryptsetup luksUUID --batch-mode --uuid "$uuid" "$img_approval"

say "initramfs: mkinitramfs with keygate's hook (crypttab and modules bound in a private mount namespace)"
conf=$work/initramfs-conf
cp -r /etc/initramfs-tools "$conf"
mkdir -p "$conf/hooks" "$conf/scripts/init-premount"
cp "$root/initramfs/initramfs-tools/hooks/keygate" "$conf/hooks/"
cp "$root/initramfs/initramfs-tools/scripts/init-premount/keygate" "$conf/scripts/init-premount/"
# Test-only probe: when the root mapping exists (after cryptroot's turn), say
# when, so key-file and keygate boots are timed at the same point.
mkdir -p "$conf/scripts/local-premount"
cat >"$conf/scripts/local-premount/e2e-unlocked" <<'PROBE'
#!/bin/sh
case "$1" in prereqs) exit 0 ;; esac
[ -b /dev/mapper/cryptroot ] &&
  echo "KEYGATE-E2E: cryptroot open $(cut -d' ' -f1 /proc/uptime) s after kernel start"
exit 0
PROBE
chmod +x "$conf/scripts/local-premount/e2e-unlocked"
cat >"$work/keygate-initramfs.conf" <<CONF
KEYGATE_VOLUMES="cryptroot=UUID=$uuid"
KEYGATE_DEADLINE=60
CONF
printf 'cryptroot UUID=%s none luks,initramfs\n' "$uuid" >"$work/crypttab"
# Mount points that must exist on the host for the private bind mounts.
mkdir -p /lib/modules /boot /etc/cryptsetup-initramfs
[ -e /etc/cryptsetup-initramfs/conf-hook ] || touch /etc/cryptsetup-initramfs/conf-hook
touch "$work/conf-hook"
make_initramfs() {  # output, crypttab, conf-hook, keygate config ("" for none)
  unshare -m sh -c "
    mount --bind '$2' /etc/crypttab &&
    mount --bind '$3' /etc/cryptsetup-initramfs/conf-hook &&
    mount --bind '$kroot/lib/modules' /lib/modules &&
    mount --bind '$kroot/boot' /boot &&
    KEYGATE_BIN='$unlocker' KEYGATE_INITRAMFS_CONF='${4:-/nonexistent}' KEYGATE_SCRIPTS='$root/initramfs' \
      mkinitramfs -d '$conf' -o '$1' '$kver'" 2>&1 |
    grep -vE '^W: Possible missing firmware|device-mapper|libdevmapper|^Command failed|setupcon|resolve device|^    UUID=|cipher modules' || true
}
make_initramfs "$work/initrd.img" "$work/crypttab" "$work/conf-hook" "$work/keygate-initramfs.conf"
[ -s "$work/initrd.img" ] || fail "mkinitramfs produced nothing"
unmkinitramfs "$work/initrd.img" "$work/initrd-contents"
for f in sbin/keygate sbin/keygate-unlock-volumes etc/keygate/initramfs.conf scripts/init-premount/keygate cryptroot/crypttab; do
  find "$work/initrd-contents" -path "*/$f" | grep -q . || fail "initramfs lacks $f"
done
main=$(find "$work/initrd-contents" -maxdepth 1 -type d -name main | head -1)
main=${main:-$work/initrd-contents}
missing=$(chroot "$main" /sbin/keygate --help >/dev/null 2>&1 && echo "" || echo yes)
[ -z "$missing" ] || fail "keygate does not run inside the initramfs (missing libraries)"
find "$main" -name 'dm-crypt.ko*' | grep -q . || fail "initramfs lacks dm-crypt"
echo "initramfs $(du -h "$work/initrd.img" | cut -f1): keygate runs inside it, dm-crypt and network drivers present"

dracut_modules=$work/dracut-modules
cp -r /usr/lib/dracut/modules.d "$dracut_modules"
cp -r "$root/initramfs/dracut/90keygate" "$dracut_modules/"
make_dracut() {  # output, keygate config, contents folder
  unshare -m sh -c "
    mount --bind '$dracut_modules' /usr/lib/dracut/modules.d &&
    KEYGATE_BIN='$unlocker' KEYGATE_INITRAMFS_CONF='$2' KEYGATE_SCRIPTS='$root/initramfs' \
    KEYGATE_TOKEN_PLUGIN='$build/lib/cryptsetup/libcryptsetup-token-keygate.so' \
      dracut --force --quiet --no-hostonly --kver '$kver' --kmoddir '$kroot/lib/modules/$kver' \
        --add keygate --omit plymouth --add-drivers 'virtio_blk virtio_net virtio_pci' \
        --include '$work/crypttab' /etc/crypttab '$1'" >"$work/dracut.log" 2>&1 ||
    { tail -20 "$work/dracut.log"; fail "dracut"; }
  mkdir -p "$3"
  (cd "$3" && { /usr/lib/dracut/skipcpio "$1" | zstd -dcq 2>/dev/null | cpio -idm --quiet 2>/dev/null ||
    /usr/lib/dracut/skipcpio "$1" | gzip -dc 2>/dev/null | cpio -idm --quiet 2>/dev/null || true; })
}
has() { [ -e "$1" ] || [ -L "$1" ]; }

if [ "${KEYGATE_E2E_ONLY:-}" != token ]; then
say "initramfs: dracut with keygate's module (systemd initrd, systemd-networkd)"
make_dracut "$work/initrd-dracut.img" "$work/keygate-initramfs.conf" "$work/dracut-contents"
for f in usr/sbin/keygate usr/sbin/keygate-unlock-volumes etc/keygate/initramfs.conf etc/crypttab \
         etc/systemd/system/initrd.target.wants/keygate-unlock.service; do
  has "$work/dracut-contents/$f" || fail "dracut image lacks $f"
done
chroot "$work/dracut-contents" /usr/sbin/keygate --help >/dev/null 2>&1 ||
  fail "keygate does not run inside the dracut image (missing libraries)"
echo "dracut image $(du -h "$work/initrd-dracut.img" | cut -f1): keygate runs inside it, unit enabled"
fi

say "initramfs: dracut, token method (systemd-cryptsetup with keygate's LUKS2 token plugin)"
{ cat "$work/keygate-initramfs.conf"; echo "KEYGATE_METHOD=token"; } >"$work/keygate-initramfs-token.conf"
make_dracut "$work/initrd-dracut-token.img" "$work/keygate-initramfs-token.conf" "$work/dracut-token-contents"
plugin_dir=$(cryptsetup --help | sed -n 's/.*external token plugin path: \(.*\)\.$/\1/p')
has "$work/dracut-token-contents$plugin_dir/libcryptsetup-token-keygate.so" ||
  fail "token-method dracut image lacks the token plugin"
! has "$work/dracut-token-contents/etc/systemd/system/initrd.target.wants/keygate-unlock.service" ||
  fail "token-method dracut image still enables keygate-unlock.service"
echo "dracut token image $(du -h "$work/initrd-dracut-token.img" | cut -f1): plugin in $plugin_dir, no keygate unit"

boot() {  # name, initrd, expect, extra driver args...
  local name=$1 initrd=$2 expect=$3; shift 3
  local tpm=$work/tpm-$name
  mkdir -p "$tpm"
  swtpm_setup --tpm2 --tpmstate "$tpm" --create-ek-cert --create-platform-cert --pcr-banks sha256 \
    >/dev/null 2>&1 || fail "swtpm_setup"
  swtpm socket --tpm2 --tpmstate dir="$tpm" --ctrl type=unixio,path="$tpm/sock" \
    --flags startup-clear >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do [ -S "$tpm/sock" ] && break; sleep 0.1; done
  python3 "$here/serial_driver.py" "$work/console-$name.log" "$expect" --timeout 480 "$@" -- \
    timeout 600 qemu-system-x86_64 -accel tcg -cpu max -m "${BOOT_MEMORY:-512}" -smp 1 -nographic -no-reboot \
      -kernel "$kroot/boot/vmlinuz-$kver" -initrd "$initrd" \
      -append "console=ttyS0 panic=-1 root=/dev/mapper/cryptroot rootfstype=ext4 rw ip=dhcp ${BOOT_APPEND:-}" \
      -drive file="${BOOT_IMG:-$img}",format=raw,if=virtio \
      -netdev "user,id=n0,restrict=on,net=169.254.0.0/16,host=169.254.169.1,guestfwd=tcp:169.254.169.254:80-cmd:busybox nc 127.0.0.1 $emu_port,guestfwd=tcp:169.254.169.253:8443-cmd:busybox nc 127.0.0.1 $srv_port" \
      -device virtio-net-pci,netdev=n0,romfile= \
      -chardev socket,id=chrtpm,path="$tpm/sock" -tpmdev emulator,id=tpm0,chardev=chrtpm \
      -device tpm-tis,tpmdev=tpm0
}

marker="KEYGATE-E2E-ROOT-MOUNTED: keygate e2e data written before encryption"

if [ -z "${KEYGATE_E2E_ONLY:-}" ]; then
say "boot 1: unattended unlock"
boot unattended "$work/initrd.img" "$marker" --forbid "Please unlock disk" || { tail -40 "$work/console-unattended.log"; fail "boot 1"; }
grep -q "key released by https://169.254.169.253:8443" "$work/console-unattended.log" || fail "boot 1: no release logged"
grep -q "/dev/mapper/cryptroot" "$work/console-unattended.log" || fail "boot 1: root not on dm-crypt"

say "boot 1a: the root needs approval: the guest waits, bob approves through the admin API"
# bob, as an approver would: waits for the request to appear, reads what
# it claims, approves it with a reason.
(
  for _ in $(seq 600); do
    rid=$("$bin/keygate-server" admin requests --json --admin-dir "$work/bob" 2>/dev/null | python3 -c '
import json, sys
for r in json.load(sys.stdin)["requests"]:
    if r["volume_id"] == sys.argv[1] and r["instance"] == "i-0e2e00000000000001":
        print(r["request_id"]); break' "$approval_volume" || true)
    if [ -n "$rid" ]; then
      echo "$rid" >"$work/approval-request"
      "$bin/keygate-server" admin approve "$rid" --reason "e2e: boot 1a" --admin-dir "$work/bob"
      exit 0
    fi
    sleep 1
  done
  exit 1
) >"$work/approver.log" 2>&1 &
approver=$!
pids+=($approver)
BOOT_IMG=$img_approval boot approval "$work/initrd.img" "$marker" --forbid "Please unlock disk" ||
  { tail -40 "$work/console-approval.log"; cat "$work/approver.log"; fail "boot 1a"; }
wait "$approver" || { cat "$work/approver.log"; fail "boot 1a: the approver found no request"; }
rid=$(cat "$work/approval-request")
grep -q "waiting for approval: request $rid (volume $approval_volume, instance i-0e2e00000000000001)" \
  "$work/console-approval.log" || fail "boot 1a: the waiting message is not on the console"
grep -q "$rid: approved (1 of 1 approvals)" "$work/approver.log" || fail "boot 1a: not approved"
"$bin/keygate-server" audit --state-dir "$work/srv" --limit 1000 | grep -q "approved by bob ($rid)" ||
  fail "boot 1a: the release does not name its approver"
echo "boot 1a: request $rid approved by bob while the guest waited"

fi

say "boot 1t: the dracut token-method image, unattended: systemd-cryptsetup asks the plugin"
releases() { "$bin/keygate-server" audit --state-dir "$work/srv" --limit 1000 | grep -c "unlock released" || true; }
before=$(releases)
BOOT_MEMORY=1024 BOOT_APPEND="rd.neednet=1" boot dracut-token "$work/initrd-dracut-token.img" "$marker" \
  --forbid "Please enter passphrase" --forbid "Entering emergency mode" ||
  { tail -60 "$work/console-dracut-token.log"; fail "dracut token boot"; }
# The plugin logs to the journal, not the console: the server's audit shows
# that it, not a passphrase, opened the volume.
[ "$(releases)" -gt "$before" ] || fail "dracut token boot: the key server released nothing"
echo "key server audit: $(( $(releases) - before )) release(s) during the token-method boot"
[ "${KEYGATE_E2E_ONLY:-}" != token ] || exit 0

say "boot 1d: the dracut image, unattended"
BOOT_MEMORY=1024 BOOT_APPEND="rd.neednet=1" boot dracut "$work/initrd-dracut.img" "$marker" \
  --forbid "Please enter passphrase" --forbid "Entering emergency mode" ||
  { tail -60 "$work/console-dracut.log"; fail "dracut boot"; }
grep -q "key released by https://169.254.169.253:8443" "$work/console-dracut.log" || fail "dracut boot: no release logged"

"$bin/keygate-server" volumes revoke "$volume_id" --state-dir "$work/srv"
say "boot 2d: the dracut image, volume revoked: systemd asks for the passphrase"
BOOT_MEMORY=1024 BOOT_APPEND="rd.neednet=1" boot dracut-revoked "$work/initrd-dracut.img" "$marker" \
  --answer "Please enter passphrase for disk" "$(cat "$work/recovery.pass")" \
  --forbid "Entering emergency mode" ||
  { tail -60 "$work/console-dracut-revoked.log"; fail "dracut boot, revoked"; }
grep -q "cryptroot not unlocked (exit 3)" "$work/console-dracut-revoked.log" || fail "dracut boot 2: refusal not shown"
[ "${KEYGATE_E2E_ONLY:-}" != dracut ] || exit 0

say "boot 2: volume revoked, the passphrase prompt answers"
boot revoked "$work/initrd.img" "$marker" --answer "Please unlock disk cryptroot" "$(cat "$work/recovery.pass")" ||
  { tail -40 "$work/console-revoked.log"; fail "boot 2"; }
grep -q "Please unlock disk cryptroot" "$work/console-revoked.log" || fail "boot 2: no prompt"
grep -q "revoked" "$work/console-revoked.log" || fail "boot 2: refusal not shown"

say "boot 3: the same disk opened by a key file in the initramfs (baseline)"
head -c 32 /dev/urandom >"$work/root.key"
chmod 600 "$work/root.key"
cryptsetup luksAddKey --batch-mode --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
  --key-file "$work/recovery.pass" "$img" "$work/root.key"
printf 'cryptroot UUID=%s %s luks,initramfs\n' "$uuid" "$work/root.key" >"$work/crypttab-keyfile"
printf 'KEYFILE_PATTERN=%s\nUMASK=0077\n' "'$work/*.key'" >"$work/conf-hook-keyfile"
make_initramfs "$work/initrd-keyfile.img" "$work/crypttab-keyfile" "$work/conf-hook-keyfile" ""
boot keyfile "$work/initrd-keyfile.img" "$marker" --forbid "Please unlock disk" ||
  { tail -40 "$work/console-keyfile.log"; fail "boot 3"; }

say "timings (guest clock under TCG, from kernel start)"
for name in unattended keyfile revoked; do
  printf '%-34s %s s\n' "$name: root unlocked" \
    "$(sed -n 's/.*KEYGATE-E2E: cryptroot open \([0-9.]*\) s after kernel start.*/\1/p' "$work/console-$name.log" | head -1)"
done
printf '%-34s %s s\n' "keygate (initramfs-tools): root unlocked" \
  "$(sed -n 's/.*keygate: cryptroot unlocked \([0-9.]*\) s after kernel start.*/\1/p' "$work/console-unattended.log" | head -1)"
printf '%-34s %s s\n' "keygate (dracut): root unlocked" \
  "$(sed -n 's/.*keygate: cryptroot unlocked \([0-9.]*\) s after kernel start.*/\1/p' "$work/console-dracut.log" | head -1)"
for name in unattended approval revoked keyfile dracut-token dracut dracut-revoked; do
  printf '%-34s %s s\n' "$name: root mounted" "$(sed -n 's/.*KEYGATE-E2E: root uptime \([0-9.]*\).*/\1/p' "$work/console-$name.log" | head -1)"
done
echo
echo "e2e: 7 passed, 0 failed"
