#!/bin/bash
# dracut module "keygate": opens keygate volumes in a systemd initrd before
# systemd-cryptsetup runs. Whatever it cannot open is left to
# systemd-cryptsetup, which asks for the passphrase as usual.
#
# Included when /etc/keygate/initramfs.conf exists (or with --add keygate).
# KEYGATE_BIN, KEYGATE_INITRAMFS_CONF and KEYGATE_SCRIPTS override the
# binary, the configuration file and the folder of keygate-unlock-volumes
# (image builders, tests).

# Installed with prefix /usr (packages) or /usr/local (cmake's default).
for _kg_prefix in /usr /usr/local; do
    [[ -n ${KEYGATE_BIN-} || ! -x $_kg_prefix/sbin/keygate ]] || KEYGATE_BIN=$_kg_prefix/sbin/keygate
    [[ -n ${KEYGATE_SCRIPTS-} || ! -x $_kg_prefix/share/keygate/keygate-unlock-volumes ]] ||
        KEYGATE_SCRIPTS=$_kg_prefix/share/keygate
done

check() {
    require_binaries "${KEYGATE_BIN:-/usr/sbin/keygate}" || return 1
    [[ -f ${KEYGATE_INITRAMFS_CONF:-/etc/keygate/initramfs.conf} ]] || return 255
    return 0
}

depends() {
    echo crypt systemd systemd-networkd
    return 0
}

installkernel() {
    instmods dm_crypt
}

install() {
    inst_binary "${KEYGATE_BIN:-/usr/sbin/keygate}" /usr/sbin/keygate
    inst_simple "${KEYGATE_INITRAMFS_CONF:-/etc/keygate/initramfs.conf}" /etc/keygate/initramfs.conf
    # glibc loads libgcc_s at run time; dependency scanning does not see it.
    inst_libdir_file "libgcc_s.so*"
    inst_multiple blkid cut sed sleep
    inst_script "${KEYGATE_SCRIPTS:-/usr/share/keygate}/keygate-unlock-volumes" \
        /usr/sbin/keygate-unlock-volumes
    inst_simple "$moddir/keygate-unlock.service" "$systemdsystemunitdir/keygate-unlock.service"
    $SYSTEMCTL -q --root "$initdir" enable keygate-unlock.service
    # The key servers are reached before the root is mounted.
    echo "rd.neednet=1" >"${initdir}/etc/cmdline.d/90keygate.conf"
}
