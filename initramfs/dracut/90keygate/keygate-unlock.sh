#!/bin/sh
# Opens each volume of KEYGATE_VOLUMES (NAME=SOURCE, root first) with
# `keygate unlock`, within KEYGATE_DEADLINE seconds for all of them. A volume
# it cannot open is left to systemd-cryptsetup (passphrase prompt).
KEYGATE_VOLUMES=""
KEYGATE_DEADLINE=120
KEYGATE_METADATA_URL="http://169.254.169.254"
KEYGATE_TIMEOUT=5
. /etc/keygate/initramfs.conf
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        keygate.deadline=*) KEYGATE_DEADLINE="${arg#keygate.deadline=}" ;;
    esac
done

now() { cut -d. -f1 /proc/uptime; }
end=$(( $(now) + KEYGATE_DEADLINE ))
modprobe -q dm_crypt 2>/dev/null
mkdir -p /run/cryptsetup

for entry in $KEYGATE_VOLUMES; do
    name="${entry%%=*}"
    source="${entry#*=}"
    [ -b "/dev/mapper/$name" ] && continue
    dev=""
    while [ "$(now)" -lt "$end" ]; do
        case "$source" in
            UUID=*|LABEL=*|PARTUUID=*|PARTLABEL=*) dev="$(blkid -l -t "$source" -o device)" ;;
            *) dev="$source" ;;
        esac
        [ -n "$dev" ] && [ -b "$dev" ] && break
        dev=""
        sleep 0.2
    done
    if [ -z "$dev" ]; then
        echo "keygate: $name: device $source did not appear; passphrase prompt follows"
        continue
    fi
    left=$(( end - $(now) ))
    [ "$left" -gt 0 ] || left=1
    echo "keygate: unlocking $name ($dev), up to ${left}s"
    /usr/sbin/keygate unlock "$dev" "$name" --deadline "$left" --timeout "$KEYGATE_TIMEOUT" \
        --metadata-url "$KEYGATE_METADATA_URL"
    rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "keygate: $name unlocked $(cut -d' ' -f1 /proc/uptime) s after kernel start"
    else
        echo "keygate: $name not unlocked (exit $rc); passphrase prompt follows"
    fi
done
exit 0
