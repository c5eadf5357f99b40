#!/bin/sh
# keygate on Google Cloud: the instance proves itself with an identity token
# (format=full) whose audience carries the unlock's binding value.
set -eu

# server: Google's signing keys as a JWK set. The server re-reads the file
# when it changes, so refresh it from a timer (hourly is plenty); a failed
# download leaves the previous file, and a broken file keeps the old keys.
curl -fsS https://www.googleapis.com/oauth2/v3/certs -o /etc/keygate/google-jwks.json.new &&
  mv /etc/keygate/google-jwks.json.new /etc/keygate/google-jwks.json
keygate-server serve --config /etc/keygate/server.json \
  --gcp-jwks /etc/keygate/google-jwks.json &

# server: a per-instance volume in project my-project, zone europe-west1-b.
keygate-server token create --platform gcp --account my-project --region europe-west1-b > token
# ... or an image group: any instance of the project running a licensed image.
keygate-server token create --platform gcp --image-group --account my-project \
  --require license_id=5731035067256925298 > group-token

# instance (the default service account's identity endpoint must be
# reachable; no scopes are needed for identity tokens):
keygate enroll /dev/nvme0n2 --format --recovery-passphrase-file /root/recovery.txt \
  --server https://keys.internal:8443 --ca ca.pem --enrollment-token-file token

cat > /etc/keygate/initramfs.conf <<'CONF'
KEYGATE_VOLUMES="data=/dev/disk/by-id/google-data"
KEYGATE_PLATFORM=gcp
CONF
