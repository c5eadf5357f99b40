#!/bin/sh
# keygate on Azure: the VM proves itself with IMDS's attested document, whose
# nonce carries the unlock's binding value.
set -eu

# server: Microsoft's roots and the intermediates IMDS does not send (PEM;
# see https://learn.microsoft.com/azure/security/fundamentals/azure-ca-details).
# Self-signed files are roots, the others intermediates.
mkdir -p /etc/keygate/azure-trust
cp DigiCert_Global_Root_G2.pem Microsoft_Azure_RSA_TLS_Issuing_CA_0*.pem /etc/keygate/azure-trust/
keygate-server serve --config /etc/keygate/server.json \
  --azure-trust-dir /etc/keygate/azure-trust &

# server: a per-VM volume in one subscription ...
keygate-server token create --platform azure \
  --account 0afbfffa-5df9-4a3b-987e-fe7577624272 > token
# ... or an image group: any VM of the subscription with this SKU.
keygate-server token create --platform azure --image-group \
  --account 0afbfffa-5df9-4a3b-987e-fe7577624272 --require sku=22_04-lts-gen2 > group-token

# VM:
keygate enroll /dev/disk/azure/scsi1/lun0 --format --recovery-passphrase-file /root/recovery.txt \
  --server https://keys.internal:8443 --ca ca.pem --enrollment-token-file token

cat > /etc/keygate/initramfs.conf <<'CONF'
KEYGATE_VOLUMES="data=/dev/disk/azure/scsi1/lun0"
KEYGATE_PLATFORM=azure
CONF
