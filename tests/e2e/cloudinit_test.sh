#!/usr/bin/env bash
# End-to-end cloud-init test: a Debian 12 image built with debootstrap from
# Debian's archive, keygate installed into it (cmake --install), booted twice
# under QEMU (TCG) with Debian's kernel, a NoCloud seed carrying the user-data,
# and the metadata emulator and key server on the host's 127.0.0.1 reached
# through restricted user networking.
#
#   boot 1: cloud-init runs cc_keygate: the blank data disk is formatted,
#           enrolled, opened (dm-crypt), given a file system, listed in
#           crypttab and fstab, and mounted; runcmd writes a file on it
#   boot 2: unattended: systemd-cryptsetup opens the data volume through the
#           keygate token plugin (crypttab _netdev), fstab mounts it, and the
#           file written on boot 1 is read back
#
# Usage: tests/e2e/cloudinit_test.sh BUILD_DIR   (about 15 minutes here; the
# debootstrap image is cached in BUILD_DIR/e2e-cache)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
e2e_begin e2e-cloudinit "${1:?usage: cloudinit_test.sh BUILD_DIR}"
started=$(date +%s)

say "kernel: Debian's linux-image, unpacked"
e2e_fetch_kernel "$cache"

# Packages of the guest: cloud-init, cryptsetup, and the libraries keygate links.
packages=systemd-sysv,udev,cloud-init,cryptsetup-bin,e2fsprogs,kmod,libcryptsetup12,libcurl4
packages=$packages,libjsoncpp25,libtss2-esys-3.0.2-0,libtss2-mu0,libtss2-rc0,libtss2-tcti-device0
packages=$packages,libtss2-tcti-swtpm0,libblkid1,libssl3,python3-yaml
# debootstrap does not resolve virtual packages: python3-cryptography needs
# python3-cffi-backend-api-max, which this provides.
packages=$packages,python3-cffi-backend
base=$cache/debootstrap-$(echo "$packages" | sha256sum | cut -c1-12).tar
if [ ! -s "$base" ]; then
  say "guest image: debootstrap bookworm from Debian's archive (cached afterwards)"
  mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  rm -rf "$work/base"
  debootstrap --variant=minbase --include="$packages" bookworm "$work/base" \
    "${mirror:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log"; fail "debootstrap"; }
  tar -C "$work/base" -cf "$base.tmp" . && mv "$base.tmp" "$base"
  rm -rf "$work/base"
fi
say "guest image: the Debian base, keygate installed, kernel modules for dm-crypt"
rootfs=$work/rootfs
mkdir -p "$rootfs"
tar -C "$rootfs" -xf "$base"
DESTDIR="$rootfs" cmake --install "$build" >/dev/null
# The kernel's modules the running system loads (dm-crypt and friends).
mkdir -p "$rootfs/lib/modules/$kver"
cp -a "$kroot/lib/modules/$kver/kernel" "$rootfs/lib/modules/$kver/"
cp "$kroot/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$rootfs/lib/modules/$kver/"
depmod -b "$rootfs" "$kver"
chroot "$rootfs" /usr/local/sbin/keygate --help >/dev/null || fail "keygate does not run in the guest image"
echo "keygate-e2e" >"$rootfs/etc/hostname"
printf '/dev/vda / ext4 defaults 0 1\n' >"$rootfs/etc/fstab"
# Network: DHCP from QEMU's user network on the first interface; cloud-init
# only from the NoCloud seed.
mkdir -p "$rootfs/etc/systemd/network" "$rootfs/etc/cloud/cloud.cfg.d"
printf '[Match]\nName=en* eth*\n[Network]\nDHCP=ipv4\nLinkLocalAddressing=no\n' \
  >"$rootfs/etc/systemd/network/80-dhcp.network"
printf 'datasource_list: [ NoCloud, None ]\nnetwork: {config: disabled}\n' \
  >"$rootfs/etc/cloud/cloud.cfg.d/80_e2e.cfg"
for unit in systemd-networkd.service systemd-networkd-wait-online.service; do
  chroot "$rootfs" systemctl enable "$unit" >/dev/null 2>&1 || fail "enable $unit"
done
chroot "$rootfs" systemctl mask serial-getty@ttyS0.service getty@tty1.service >/dev/null 2>&1 || true
# Boot 2's report: after every file system is mounted, what the data volume
# holds, then power off. Boot 1 skips it (no marker yet). Not ordered after
# cloud-final.service: that one comes after multi-user.target (a cycle).
cat >"$rootfs/etc/systemd/system/keygate-e2e-report.service" <<'UNIT'
[Unit]
Description=keygate e2e: report the data volume and power off
After=remote-fs.target local-fs.target
ConditionPathExists=/var/lib/keygate-e2e/boot-1-done
[Service]
Type=oneshot
StandardOutput=tty
TTYPath=/dev/ttyS0
ExecStart=/bin/sh -c 'echo "KEYGATE-E2E: data is $(findmnt -n -o SOURCE /data)"; echo "KEYGATE-E2E-BOOT2: $(cat /data/written-on-boot-1)"; systemctl --no-block poweroff'
[Install]
WantedBy=multi-user.target
UNIT
chroot "$rootfs" systemctl enable keygate-e2e-report.service >/dev/null 2>&1 || fail "enable the report unit"
img=$work/root.img
truncate -s 3G "$img"
mke2fs -q -F -t ext4 -d "$rootfs" "$img" || fail "root image"
rm -rf "$rootfs"

say "initramfs for a plain root on virtio (mkinitramfs)"
conf=$work/initramfs-conf
cp -r /etc/initramfs-tools "$conf"
mkdir -p /lib/modules /boot
unshare -m sh -c "
  mount --bind '$kroot/lib/modules' /lib/modules &&
  mount --bind '$kroot/boot' /boot &&
  mkinitramfs -d '$conf' -o '$work/initrd.img' '$kver'" >"$work/mkinitramfs.log" 2>&1 ||
  { tail -20 "$work/mkinitramfs.log"; fail "mkinitramfs"; }

say "key server and metadata emulator on 127.0.0.1"
e2e_start_servers "$work" 210987654321 eu-west-1 i-0c10d1417000000001 ami-0c10d141700000001
token=$("$bin/keygate-server" token create --state-dir "$work/srv" --account 210987654321 --region eu-west-1)

say "NoCloud seed: the user-data of examples/cloud-init, pointed at this test's servers"
cat >"$work/user-data" <<USERDATA
#cloud-config
keygate:
  servers: [https://169.254.169.253:8443]
  ca: |
$(sed 's/^/    /' "$work/srv/ca.pem")
  enrollment_token: $token
  tpm: auto
  volumes:
    - device: /dev/vdb
      name: data
      mode: format
      filesystem: ext4
      mount: /data
runcmd:
  - [sh, -c, 'echo "written on boot 1 by cloud-init" > /data/written-on-boot-1 && sync']
  - [sh, -c, 'mkdir -p /var/lib/keygate-e2e && touch /var/lib/keygate-e2e/boot-1-done && sync']
  - [sh, -c, 'echo "KEYGATE-E2E-BOOT1: \$(findmnt -n -o SOURCE /data) \$(grep -c "^data " /etc/crypttab) crypttab line(s)" > /dev/ttyS0']
power_state:
  mode: poweroff
  delay: now
  timeout: 30
USERDATA
/usr/bin/python3 "$root/cloudinit/cc_keygate.py" validate "$work/user-data" || fail "user-data invalid"
cloud-init schema --config-file "$work/user-data" >/dev/null || fail "cloud-init schema rejects the user-data"
printf 'instance-id: iid-keygate-e2e\nlocal-hostname: keygate-e2e\n' >"$work/meta-data"
seed=$work/seed.img
truncate -s 2M "$seed"
mkfs.vfat -n CIDATA "$seed" >/dev/null
mcopy -i "$seed" "$work/user-data" "$work/meta-data" ::
data=$work/data.img
truncate -s 256M "$data"

boot() {  # name, expect, driver args...
  local name=$1 expect=$2; shift 2
  python3 "$here/serial_driver.py" "$work/console-$name.log" "$expect" --timeout 900 "$@" -- \
    timeout 1000 qemu-system-x86_64 -accel tcg -cpu max -m 1024 -smp 1 -nographic -no-reboot \
      -kernel "$kroot/boot/vmlinuz-$kver" -initrd "$work/initrd.img" \
      -append "console=ttyS0 panic=-1 root=/dev/vda rootfstype=ext4 rw net.ifnames=0" \
      -drive file="$img",format=raw,if=virtio \
      -drive file="$data",format=raw,if=virtio \
      -drive file="$seed",format=raw,if=virtio,readonly=on \
      -netdev "user,id=n0,restrict=on,net=169.254.0.0/16,host=169.254.169.1,guestfwd=tcp:169.254.169.254:80-cmd:busybox nc 127.0.0.1 $emu_port,guestfwd=tcp:169.254.169.253:8443-cmd:busybox nc 127.0.0.1 $srv_port" \
      -device virtio-net-pci,netdev=n0,romfile=
}

say "boot 1: cloud-init formats, enrolls and mounts the blank data disk"
t1=$(date +%s)
boot first "KEYGATE-E2E-BOOT1: /dev/mapper/data 1 crypttab line(s)" ||
  { grep -E "keygate|cloud-init|Failed" "$work/console-first.log" | tail -40; fail "boot 1"; }
t1=$(( $(date +%s) - t1 ))
cryptsetup isLuks "$data" || fail "the data disk is not LUKS after boot 1"
"$bin/keygate" status "$data" | grep -q "volume" || fail "the data disk has no keygate token"
"$bin/keygate-server" audit --state-dir "$work/srv" | grep -q "enroll.confirm ok" || fail "no enrollment on the server"

say "boot 2: unattended; the token plugin opens the data volume, the file of boot 1 is there"
releases() { "$bin/keygate-server" audit --state-dir "$work/srv" --limit 1000 | grep -c "unlock released" || true; }
before=$(releases)
t2=$(date +%s)
boot second "KEYGATE-E2E-BOOT2: written on boot 1 by cloud-init" --forbid "Please enter passphrase" ||
  { tail -60 "$work/console-second.log"; fail "boot 2"; }
t2=$(( $(date +%s) - t2 ))
grep -q "KEYGATE-E2E: data is /dev/mapper/data" "$work/console-second.log" || fail "boot 2: /data not on the mapping"
[ "$(releases)" -gt "$before" ] || fail "boot 2: the key server released nothing"

say "timings (wall clock, TCG)"
printf '%-48s %s s\n' "boot 1 (cloud-init: format, enroll, mount)" "$t1" \
  "boot 2 (unattended unlock, mount, read back)" "$t2" \
  "whole test (image build included)" "$(( $(date +%s) - started ))"
echo
echo "e2e cloud-init: 2 passed, 0 failed"
