#!/bin/sh
# keygate on AWS: a data volume bound to one instance, and a root volume baked
# into an AMI (image group). Run the "server" lines on the key server host,
# the "instance" lines on the instance.
set -eu

# server: AWS's per-region certificates ship with keygate-server; nothing to
# configure. New regions or rotated certificates: --aws-trust-dir DIR with
# <region>.pem files.
keygate-server serve --config /etc/keygate/server.json &

# server: a token for one per-instance volume in account 111122223333.
keygate-server token create --platform aws --account 111122223333 --region eu-west-1 > token

# instance: format the blank data disk, enroll it (the instance's identity
# document is the evidence), keep a recovery passphrase.
keygate enroll /dev/nvme1n1 --format --recovery-passphrase-file /root/recovery.txt \
  --server https://keys.internal:8443 --ca ca.pem --enrollment-token-file token

# image builder: a group token for every instance of the golden AMI.
keygate-server token create --platform aws --image-group \
  --account 111122223333 --region eu-west-1 --image-id ami-0123456789abcdef0 > group-token

# /etc/keygate/initramfs.conf in the image
cat > /etc/keygate/initramfs.conf <<'CONF'
KEYGATE_VOLUMES="cryptroot=UUID=1f514948-514a-446c-aa61-3dc24e9488d2"
KEYGATE_PLATFORM=aws
CONF
