#!/usr/bin/env bash
# Unlock latency: keygate vs clevis + tang, on this machine, in one run.
#
#   keygate:        keygate unlock --verify-only   (challenge, IMDSv2 evidence,
#                   unlock over TLS, unwrap, keyslot check), the release
#                   build (static, scripts/build-release.sh: what goes into
#                   the initramfs) and the shared-library development build
#   clevis + tang:  clevis luks pass | cryptsetup open --test-passphrase
#                   (tang over HTTP, JOSE decrypt, keyslot check)
#   keygate + TPM:  the same unlock of a TPM-bound volume: swtpm (socket
#                   TCTI) makes the attestation key and a quote over PCRs
#                   0,4,7; and a two-factor volume (quote + unseal)
#
# Both open a keyslot of a LUKS2 volume of the same size, served from
# 127.0.0.1. Prints median and p95 wall time and the ratio.
# Usage: bench/unlock_latency.sh [RUNS]   (default 20; KEYGATE_BUILD=dir,
#        KEYGATE_RELEASE_BUILD=dir; the release build is made if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
runs=${1:-20}
build=${KEYGATE_BUILD:-$root/build}
bin=$build/bin
release=${KEYGATE_RELEASE_BUILD:-$root/build-release}

KEYGATE_WITH_BENCH=1 ./scripts/setup.sh >/dev/null
if [ ! -x "$bin/keygate" ]; then
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$build" -j "$(nproc)" --target keygate keygate-server keygate-metadata-emulator
fi
[ -x "$release/dist/keygate" ] || ./scripts/build-release.sh "$release" >&2
kg=$release/dist/keygate

work=$(mktemp -d /tmp/keygate-bench-XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

die() { echo "bench: $*" >&2; exit 1; }
# Shows a helper's log and stops the run: no step fails quietly.
helper_failed() { echo "bench: $1 did not come up; its log ($2):" >&2; cat "$2" >&2 || true; exit 1; }
wait_port() {  # port file, log, pid
  for _ in $(seq 100); do
    [ -s "$1" ] && { cat "$1"; return; }
    kill -0 "$3" 2>/dev/null || break
    sleep 0.1
  done
  helper_failed "the server writing $1" "$2"
}
# A port for a helper that cannot bind port 0 and report it (swtpm, tang
# under socat): below the kernel's ephemeral range, so no outgoing connection
# (or its TIME-WAIT) holds it, and in no socket state at all right now.
ephemeral_low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range)
free_port() {  # [count of consecutive ports]
  local n=${1:-1} p i busy
  for _ in $(seq 50); do
    p=$(shuf -i 10000-$((ephemeral_low - n - 1)) -n 1)
    busy=
    for ((i = 0; i < n; i++)); do
      [ -z "$(ss -Htan "( sport = :$((p + i)) or dport = :$((p + i)) )")" ] || busy=1
    done
    [ -z "$busy" ] && { echo "$p"; return; }
  done
  die "no free port below $ephemeral_low"
}
run_logged() {  # log, command...: output kept; shown if the command fails
  local log=$1; shift
  "$@" >"$log" 2>&1 || { echo "bench: failed: $*" >&2; cat "$log" >&2; exit 1; }
}

size=64M

# --- keygate ---------------------------------------------------------------
run_logged "$work/emu-init.log" "$bin/keygate-metadata-emulator" init --state-dir "$work/emu"
"$bin/keygate-metadata-emulator" serve --state-dir "$work/emu" --listen 127.0.0.1:0 \
  --port-file "$work/emu.port" 2>"$work/emu.log" &
pids+=($!)
emu=http://127.0.0.1:$(wait_port "$work/emu.port" "$work/emu.log" "$!")
"$bin/keygate-server" serve --state-dir "$work/srv" --listen 127.0.0.1:0 --port-file "$work/srv.port" \
  --aws-trust-dir "$work/emu/aws-trust" --log-level warning 2>"$work/srv.log" &
pids+=($!)
srv=https://127.0.0.1:$(wait_port "$work/srv.port" "$work/srv.log" "$!")
"$bin/keygate-server" token create --state-dir "$work/srv" >"$work/token"
truncate -s $size "$work/kg.img"
run_logged "$work/enroll-kg.log" "$bin/keygate" enroll "$work/kg.img" --format --no-recovery --server "$srv" \
  --ca "$work/srv/ca.pem" --enrollment-token-file "$work/token" --metadata-url "$emu"

# --- keygate with a TPM (swtpm) --------------------------------------------
tpm_port=$(free_port 2)
mkdir -p "$work/swtpm-state"
swtpm socket --tpm2 --server type=tcp,port=$tpm_port,bindaddr=127.0.0.1 \
  --ctrl type=tcp,port=$((tpm_port + 1)),bindaddr=127.0.0.1 --tpmstate dir="$work/swtpm-state" \
  --flags not-need-init,startup-clear >"$work/tpm.log" 2>&1 &
tpm_pid=$!
pids+=($tpm_pid)
up=
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$((tpm_port + 1))") 2>/dev/null && { up=1; break; }
  kill -0 "$tpm_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$up" ] || helper_failed "swtpm on ports $tpm_port and $((tpm_port + 1))" "$work/tpm.log"
tcti="swtpm:host=127.0.0.1,port=$tpm_port"
for kind in tpm tpm2f; do
  "$bin/keygate-server" token create --state-dir "$work/srv" >"$work/token-$kind"
  truncate -s $size "$work/$kind.img"
  extra=(); [ "$kind" = tpm2f ] && extra=(--tpm-seal)
  run_logged "$work/enroll-$kind.log" "$bin/keygate" enroll "$work/$kind.img" --format --no-recovery \
    --server "$srv" --ca "$work/srv/ca.pem" --enrollment-token-file "$work/token-$kind" --metadata-url "$emu" \
    --tpm required --tcti "$tcti" "${extra[@]}"
done

# --- clevis + tang ---------------------------------------------------------
mkdir -p "$work/tang"
run_logged "$work/tang-keygen.log" /usr/libexec/tangd-keygen "$work/tang"
tang_port=$(free_port)
socat TCP-LISTEN:"$tang_port",bind=127.0.0.1,reuseaddr,fork EXEC:"/usr/libexec/tangd $work/tang" \
  >"$work/tang.log" 2>&1 &
tang_pid=$!
pids+=($tang_pid)
up=
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$tang_port/adv" >/dev/null 2>&1 && { up=1; break; }
  kill -0 "$tang_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$up" ] || helper_failed "tang (socat) on port $tang_port" "$work/tang.log"
truncate -s $size "$work/cl.img"
printf 'bench passphrase' >"$work/pass"
run_logged "$work/luksformat.log" cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 \
  --pbkdf-force-iterations 1000 --key-file "$work/pass" "$work/cl.img"
run_logged "$work/clevis-bind.log" clevis luks bind -y -d "$work/cl.img" -k "$work/pass" tang \
  "{\"url\":\"http://127.0.0.1:$tang_port\"}"
slot=$(clevis luks list -d "$work/cl.img" | sed -n 's/^\([0-9]*\): tang.*/\1/p' | head -1)

once() {  # name, command...: one timed run, appended (microseconds) to $work/<name>
  local name=$1; shift
  local t0 t1
  t0=${EPOCHREALTIME/./}  # microseconds, read without forking
  "$@" >/dev/null 2>&1 || { echo "bench: $name failed: $*" >&2; "$@"; exit 1; }
  t1=${EPOCHREALTIME/./}
  echo $((t1 - t0)) >>"$work/$name"
}
clevis_unlock() {
  clevis luks pass -d "$work/cl.img" -s "$slot" |
    cryptsetup open --test-passphrase --key-slot "$slot" --key-file - "$work/cl.img"
}
all() {  # one run of every tool, in turn
  once keygate "$kg" unlock "$work/kg.img" --verify-only --metadata-url "$emu"
  once shared "$bin/keygate" unlock "$work/kg.img" --verify-only --metadata-url "$emu"
  once clevis clevis_unlock
  once tpm "$kg" unlock "$work/tpm.img" --verify-only --metadata-url "$emu" --tcti "$tcti"
  once tpm2f "$kg" unlock "$work/tpm2f.img" --verify-only --metadata-url "$emu" --tcti "$tcti"
}
# The tools take turns, run after run, so a slow spell of the machine falls on
# all of them alike. Three warm-up rounds (page cache, server state) first.
for _ in 1 2 3; do all; done
rm -f "$work"/{keygate,shared,clevis,tpm,tpm2f}
for _ in $(seq "$runs"); do all; done

stats() {  # file -> "median p95" in ms with one decimal
  sort -n "$1" | awk '{v[NR]=$1} END {
    m = (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2;
    i = int(0.95 * NR + 0.999); if (i > NR) i = NR;
    printf "%.1f %.1f\n", m/1000, v[i]/1000 }'
}
read -r kg_med kg_p95 < <(stats "$work/keygate")
read -r sh_med sh_p95 < <(stats "$work/shared")
read -r cl_med cl_p95 < <(stats "$work/clevis")
read -r tpm_med tpm_p95 < <(stats "$work/tpm")
read -r tpm2f_med tpm2f_p95 < <(stats "$work/tpm2f")

echo
echo "unlock latency, $runs runs each, LUKS2 volume of $size, servers on 127.0.0.1 ($(nproc) cores)"
printf '%-48s %12s %12s\n' "tool" "median (ms)" "p95 (ms)"
printf '%-48s %12s %12s\n' "keygate unlock --verify-only (release)" "$kg_med" "$kg_p95"
printf '%-48s %12s %12s\n' "  the same, shared-library build" "$sh_med" "$sh_p95"
printf '%-48s %12s %12s\n' "clevis luks pass + cryptsetup --test-passphrase" "$cl_med" "$cl_p95"
printf '%-48s %12s %12s\n' "keygate, TPM quote (swtpm, PCRs 0,4,7)" "$tpm_med" "$tpm_p95"
printf '%-48s %12s %12s\n' "keygate, TPM quote + sealed share" "$tpm2f_med" "$tpm2f_p95"
awk -v a="$cl_med" -v b="$kg_med" 'BEGIN { printf "\nclevis + tang / keygate release (median): %.1fx\n", a / b }'
awk -v a="$cl_med" -v b="$sh_med" 'BEGIN { printf "clevis + tang / keygate shared build (median): %.1fx\n", a / b }'
awk -v t="$tpm_med" -v b="$kg_med" 'BEGIN { printf "TPM quote adds (median): %.1f ms\n", t - b }'
