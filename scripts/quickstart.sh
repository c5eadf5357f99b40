#!/usr/bin/env bash
# keygate quickstart, on the embedded default (SQLite store, generated KEK and
# TLS certificate): starts keygate-server and the metadata emulator on
# 127.0.0.1, creates a LUKS2 volume file, enrolls it, then unlocks it as a
# booting instance would. Everything lives in ./.quickstart (removed first).
#
# Usage: scripts/quickstart.sh [aws|gcp|azure]   (the cloud the emulator
# plays; default aws)
set -euo pipefail
platform=${1:-aws}
case "$platform" in
  aws|gcp|azure) ;;
  *) echo "usage: $0 [aws|gcp|azure]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "install build dependencies (apt)"
./scripts/setup.sh

step "build"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" --target keygate keygate-server keygate-metadata-emulator
bin=$root/build/bin

work=$root/.quickstart
rm -rf "$work"
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_port() {
  for _ in $(seq 100); do
    [ -s "$1" ] && { cat "$1"; return 0; }
    sleep 0.1
  done
  echo "quickstart: $2 did not start; its log:" >&2
  cat "$3" >&2
  exit 1
}

case "$platform" in
  aws) what="AWS IMDSv2"; identity=(--region us-east-1 --account 123456789012
         --instance-id i-0quickstart000001 --image-id ami-0quickstart00001) ;;
  gcp) what="GCP metadata server"; identity=(--project-id quickstart-project
         --instance-id 4567890123456789012 --instance-name quickstart-1) ;;
  azure) what="Azure IMDS"; identity=(--subscription-id 5f130ffc-0a3e-4795-b691-4f56a12a5547
         --vm-id 9c0c5e9c-5a3b-4b8f-9d7e-2f1d3c4b5a69) ;;
esac
step "start the metadata emulator ($what, test signing keys)"
"$bin/keygate-metadata-emulator" init --state-dir "$work/emulator" --region us-east-1
"$bin/keygate-metadata-emulator" serve --state-dir "$work/emulator" --listen 127.0.0.1:0 \
  --port-file "$work/emulator.port" --platform "$platform" "${identity[@]}" \
  >"$work/emulator.log" 2>&1 &
pids+=($!)
emu_port=$(wait_port "$work/emulator.port" emulator "$work/emulator.log")
echo "metadata service: http://127.0.0.1:$emu_port"

step "start keygate-server (state in $work/server: SQLite store, KEK and TLS generated, 0600)"
"$bin/keygate-server" serve --state-dir "$work/server" --listen 127.0.0.1:0 \
  --port-file "$work/server.port" --aws-trust-dir "$work/emulator/aws-trust" \
  --gcp-jwks "$work/emulator/gcp-trust/jwks.json" --azure-trust-dir "$work/emulator/azure-trust" \
  >"$work/server.log" 2>&1 &
pids+=($!)
srv_port=$(wait_port "$work/server.port" keygate-server "$work/server.log")
server=https://127.0.0.1:$srv_port
cat "$work/server.log"
ls -l "$work/server"

step "create a one-time enrollment token"
"$bin/keygate-server" token create --state-dir "$work/server" --platform "$platform" >"$work/enroll.token"
chmod 600 "$work/enroll.token"
echo "token written to $work/enroll.token (shown once, stored only as a hash)"

step "create a 64 MiB volume file and enroll it (LUKS2 format + keygate keyslot + token)"
truncate -s 64M "$work/volume.img"
"$bin/keygate" enroll "$work/volume.img" --format --no-recovery \
  --server "$server" --ca "$work/server/ca.pem" \
  --enrollment-token-file "$work/enroll.token" \
  --metadata-url "http://127.0.0.1:$emu_port" --description "quickstart volume"
"$bin/keygate" status "$work/volume.img"

step "unlock as a booting instance would (verify-only: no device-mapper needed)"
"$bin/keygate" unlock "$work/volume.img" --verify-only --metadata-url "http://127.0.0.1:$emu_port"

step "server side: volumes and audit trail"
"$bin/keygate-server" volumes list --state-dir "$work/server"
"$bin/keygate-server" audit --state-dir "$work/server"

echo
echo "quickstart: enroll + unlock round trip completed ($platform)."
