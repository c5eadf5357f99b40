#!/bin/bash
# dracut module "keygate": opens keygate volumes in a systemd initrd before
# systemd-cryptsetup runs. Whatever it cannot open is left to
# systemd-cryptsetup, which asks for the passphrase as usual.
#
# Included when /etc/keygate/initramfs.conf exists (or with --add keygate).
# KEYGATE_BIN, KEYGATE_INITRAMFS_CONF and KEYGATE_SCRIPTS override the
# binary, the configuration file and the folder of keygate-unlock-volumes
# (image builders, tests).
#
# Two methods, chosen by KEYGATE_METHOD in the configuration file:
#   service (default)  keygate-unlock.service opens the volumes before
#                      cryptsetup-pre.target;
#   token              no keygate unit at all: systemd-cryptsetup opens the
#                      volumes itself through the LUKS2 token plugin
#                      (libcryptsetup-token-keygate.so), after the network
#                      is online. KEYGATE_TOKEN_PLUGIN overrides the plugin.

# A static keygate (the release build) needs nothing beside it.
keygate_is_static() { LC_ALL=C ldd "$1" 2>&1 | grep -qE 'statically linked|not a dynamic executable'; }

# Installed with prefix /usr (packages) or /usr/local (cmake's default); where
# both hold one, the static one is taken.
for _kg_prefix in /usr /usr/local; do
    [[ -n ${KEYGATE_SCRIPTS-} || ! -x $_kg_prefix/share/keygate/keygate-unlock-volumes ]] ||
        KEYGATE_SCRIPTS=$_kg_prefix/share/keygate
done
if [[ -z ${KEYGATE_BIN-} ]]; then
    for _kg_bin in /usr/sbin/keygate /usr/local/sbin/keygate; do
        [[ -x $_kg_bin ]] || continue
        [[ -n ${KEYGATE_BIN-} ]] || KEYGATE_BIN=$_kg_bin
        if keygate_is_static "$_kg_bin"; then KEYGATE_BIN=$_kg_bin; break; fi
    done
fi

check() {
    [[ -f ${KEYGATE_INITRAMFS_CONF:-/etc/keygate/initramfs.conf} ]] || return 255
    return 0
}

depends() {
    echo crypt systemd systemd-networkd
    return 0
}

installkernel() {
    instmods dm_crypt
    # TPM-bound volumes quote through /dev/tpmrm0 (vTPMs: CRB or TIS).
    hostonly='' instmods tpm_crb tpm_tis || :
}

# Where libcryptsetup loads token plugins from (the same path in the initrd).
keygate_plugin_dir() {
    cryptsetup --help 2>/dev/null | sed -n 's/.*external token plugin path: \(.*\)\.$/\1/p'
}

install_token_method() {
    local plugin_dir plugin deadline metadata
    plugin_dir=$(keygate_plugin_dir)
    plugin=${KEYGATE_TOKEN_PLUGIN:-$plugin_dir/libcryptsetup-token-keygate.so}
    if [[ -z $plugin_dir || ! -f $plugin ]]; then
        derror "keygate: token plugin $plugin not found"
        return 1
    fi
    inst_library "$plugin" "$plugin_dir/libcryptsetup-token-keygate.so"
    # shellcheck disable=SC1090
    deadline=$(. "$conf" && echo "${KEYGATE_DEADLINE:-120}")
    metadata=$(. "$conf" && echo "${KEYGATE_METADATA_URL:-http://169.254.169.254}")
    platform=$(. "$conf" && echo "${KEYGATE_PLATFORM:-}")
    tcti=$(. "$conf" && echo "${KEYGATE_TCTI:-}")
    mkdir -p "$initdir$systemdsystemunitdir/systemd-cryptsetup@.service.d"
    cat >"$initdir$systemdsystemunitdir/systemd-cryptsetup@.service.d/keygate.conf" <<UNIT
[Unit]
# The keygate token plugin asks the key server: the network comes first.
Wants=network-online.target
After=network-online.target

[Service]
Environment=KEYGATE_DEADLINE=$deadline KEYGATE_METADATA_URL=$metadata KEYGATE_PLATFORM=$platform KEYGATE_TCTI=$tcti
UNIT
}

install() {
    local conf=${KEYGATE_INITRAMFS_CONF:-/etc/keygate/initramfs.conf}
    inst_simple "$conf" /etc/keygate/initramfs.conf
    # The key servers are reached before the root is mounted.
    echo "rd.neednet=1" >"${initdir}/etc/cmdline.d/90keygate.conf"
    # shellcheck disable=SC1090
    if [[ $(. "$conf" && echo "${KEYGATE_METHOD:-service}") == token ]]; then
        # The plugin runs inside systemd-cryptsetup, a dynamic program: glibc
        # loads libgcc_s at run time, which dependency scanning does not see.
        inst_libdir_file "libgcc_s.so*"
        install_token_method
        return
    fi
    local bin=${KEYGATE_BIN:-/usr/sbin/keygate}
    inst_binary "$bin" /usr/sbin/keygate
    # A shared build needs libgcc_s as above; a static one nothing.
    keygate_is_static "$bin" || inst_libdir_file "libgcc_s.so*"
    inst_multiple blkid cut sed sleep
    inst_script "${KEYGATE_SCRIPTS:-/usr/share/keygate}/keygate-unlock-volumes" \
        /usr/sbin/keygate-unlock-volumes
    inst_simple "$moddir/keygate-unlock.service" "$systemdsystemunitdir/keygate-unlock.service"
    $SYSTEMCTL -q --root "$initdir" enable keygate-unlock.service
}
