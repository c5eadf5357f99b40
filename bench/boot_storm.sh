#!/usr/bin/env bash
# Boot storm: how many unlocks a second keygate-server gives, and at what
# latency, with tang's recovery exchange under the same load generator in
# the same run.
#
#   keygate: keygate-server (this build, embedded SQLite store, every release
#            committed to the audit trail before its key leaves) behind real
#            TLS; then on PostgreSQL (keygate-pg: one replica; keygate-pg-x2:
#            two replicas on one database, unlocks spread over them), a
#            throwaway cluster with its default durability; for each unlock keygate-boot-storm opens a new TCP and TLS
#            connection (no resumption, as at boot), asks for a challenge,
#            sends an unlock with AWS-format evidence signed by the metadata
#            emulator, and checks the secret unwraps to the volume's.
#   tang:    Debian's tang as shipped, socket-activated the way its
#            tangd.socket (Accept=yes) and tangd@.service run it, through
#            systemd-socket-activate; each exchange is a new connection and a
#            POST /rec/<kid>, checked the way clevis checks it.
#   nginx:   the floor under every row: Debian's nginx answering 200 to a
#            POST over the same TLS a keygate unlock uses (TLS 1.3, an ECDSA
#            P-256 certificate, no resumption), one request per new
#            connection and no other work: what this machine gives any TLS
#            service whose clients each open a new connection.
#
# Rows: closed loop (N clients back to back: the maximum) and open loop
# (unlocks started at a fixed rate, latency from the scheduled start).
# The generator runs on the same 2 cores as the servers.
#
# Usage: bench/boot_storm.sh [COUNT]   (default 10000 per row;
#        KEYGATE_BUILD=dir, default build/; RATES="500 1000": the open-loop
#        rows' offered unlocks per second; CLIENTS=32 closed-loop clients;
#        THREADS: the generator's threads, default one per core)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
count=${1:-10000}
rates=${RATES:-500 1000}
clients=${CLIENTS:-32}
threads=${THREADS:-$(nproc)}
build=${KEYGATE_BUILD:-$root/build}
bin=$build/bin

KEYGATE_WITH_BENCH=1 ./scripts/setup.sh >/dev/null
if [ ! -x "$bin/keygate-boot-storm" ] || [ ! -x "$bin/keygate-server" ]; then
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$build" -j "$(nproc)" --target keygate-server keygate-metadata-emulator keygate-boot-storm
fi

work=$(mktemp -d /tmp/keygate-storm-XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

die() { echo "bench: $*" >&2; exit 1; }
helper_failed() { echo "bench: $1 did not come up; its log ($2):" >&2; cat "$2" >&2 || true; exit 1; }
wait_port() {  # port file, log, pid
  for _ in $(seq 100); do
    [ -s "$1" ] && { cat "$1"; return; }
    kill -0 "$3" 2>/dev/null || break
    sleep 0.1
  done
  helper_failed "the server writing $1" "$2"
}
run_logged() {  # log, command...: output kept; shown if the command fails
  local log=$1; shift
  "$@" >"$log" 2>&1 || { echo "bench: failed: $*" >&2; cat "$log" >&2; exit 1; }
}
# A port below the kernel's ephemeral range that nothing uses, for tang
# (systemd-socket-activate cannot report a port it chose).
ephemeral_low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range)
free_port() {
  local p
  for _ in $(seq 50); do
    p=$(shuf -i 10000-$((ephemeral_low - 1)) -n 1)
    [ -z "$(ss -Htan "( sport = :$p or dport = :$p )")" ] && { echo "$p"; return; }
  done
  die "no free port below $ephemeral_low"
}

# --- keygate -----------------------------------------------------------------
run_logged "$work/emu-init.log" "$bin/keygate-metadata-emulator" init --state-dir "$work/emu"
"$bin/keygate-metadata-emulator" serve --state-dir "$work/emu" --listen 127.0.0.1:0 \
  --port-file "$work/emu.port" 2>"$work/emu.log" &
pids+=($!)
emu=http://127.0.0.1:$(wait_port "$work/emu.port" "$work/emu.log" "$!")
# Every unlock comes from one address and one instance document, where a
# real storm comes from a thousand: the per-source and per-instance rate
# limits would refuse nearly all of them, and the per-address connection
# cap (128) whatever an open loop has in flight beyond it. This run raises
# them out of the way (the limiter and the counting still run).
cat >"$work/server.json" <<'EOF'
{
  "rate_limits": {
    "per_source": {"per_second": 1000000, "burst": 1000000},
    "per_instance": {"per_second": 1000000, "burst": 1000000}
  },
  "connections": {"max": 8192, "per_source": 8192}
}
EOF
"$bin/keygate-server" serve --state-dir "$work/srv" --config "$work/server.json" --listen 127.0.0.1:0 \
  --port-file "$work/srv.port" --aws-trust-dir "$work/emu/aws-trust" --log-level warning \
  2>"$work/srv.log" &
srv_pid=$!
pids+=($srv_pid)
srv=https://127.0.0.1:$(wait_port "$work/srv.port" "$work/srv.log" "$srv_pid")
"$bin/keygate-server" token create --state-dir "$work/srv" --uses 10 >"$work/token"

# --- tang ----------------------------------------------------------------------
mkdir -p "$work/tang"
run_logged "$work/tang-keygen.log" /usr/libexec/tangd-keygen "$work/tang"
tang_port=$(free_port)
systemd-socket-activate --inetd --accept --listen "127.0.0.1:$tang_port" \
  /usr/libexec/tangd "$work/tang" >"$work/tang.log" 2>&1 &
tang_pid=$!
pids+=($tang_pid)
up=
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$tang_port/adv" >/dev/null 2>&1 && { up=1; break; }
  kill -0 "$tang_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$up" ] || helper_failed "tang on port $tang_port" "$work/tang.log"
tang=http://127.0.0.1:$tang_port

# --- nginx: TLS and nothing else ------------------------------------------------
# Its own throwaway CA and an ECDSA P-256 certificate for 127.0.0.1, as
# keygate-server makes its own; one worker per core; TLS 1.3 only, no
# session cache and no tickets (the generator offers no resumption anyway).
mkdir -p "$work/nginx"
run_logged "$work/nginx-ca.log" openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$work/nginx/ca.key" -out "$work/nginx/ca.pem" -subj /CN=bench-ca -days 2
run_logged "$work/nginx-csr.log" openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$work/nginx/leaf.key" -out "$work/nginx/leaf.csr" -subj /CN=127.0.0.1
printf 'subjectAltName=IP:127.0.0.1\n' >"$work/nginx/leaf.ext"
run_logged "$work/nginx-sign.log" openssl x509 -req -in "$work/nginx/leaf.csr" -CA "$work/nginx/ca.pem" \
  -CAkey "$work/nginx/ca.key" -CAcreateserial -out "$work/nginx/leaf.pem" -days 2 -extfile "$work/nginx/leaf.ext"
nginx_port=$(free_port)
cat >"$work/nginx/nginx.conf" <<EOF
daemon off;
worker_processes $(nproc);
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  server {
    listen 127.0.0.1:$nginx_port ssl backlog=4096;
    ssl_certificate $work/nginx/leaf.pem;
    ssl_certificate_key $work/nginx/leaf.key;
    ssl_protocols TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    location / { return 200 "ok\n"; }
  }
}
EOF
nginx -e "$work/nginx/error.log" -p "$work/nginx" -c "$work/nginx/nginx.conf" >"$work/nginx.log" 2>&1 &
nginx_pid=$!
pids+=($nginx_pid)
up=
for _ in $(seq 100); do
  curl -fsS --cacert "$work/nginx/ca.pem" -d '{}' "https://127.0.0.1:$nginx_port/" >/dev/null 2>&1 && { up=1; break; }
  kill -0 "$nginx_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$up" ] || helper_failed "nginx on port $nginx_port" "$work/nginx/error.log"

# --- keygate on PostgreSQL: one replica, then two on one database -------------
# A throwaway cluster (Debian's PostgreSQL 15, default durability: fsync on,
# synchronous_commit on) on a Unix socket, as tests/pg_cluster.sh makes it.
tests/pg_cluster.sh start "$work/pg-cluster" || die "PostgreSQL did not start"
cleanup_pg() { tests/pg_cluster.sh stop "$work/pg-cluster" || true; }
trap 'cleanup_pg; cleanup' EXIT
pg_dir=$(cat "$work/pg-cluster")
pg_pid=$(head -n 1 "$pg_dir/data/postmaster.pid")
psql -q -h "$pg_dir" -U postgres -d postgres -c "CREATE DATABASE bench" >/dev/null
pg_store="host=$pg_dir user=postgres dbname=bench"
mkdir -m 0700 "$work/pg1"
echo "$pg_store" >"$work/pg1/store.conf"
"$bin/keygate-server" serve --state-dir "$work/pg1" --config "$work/server.json" --listen 127.0.0.1:0 \
  --port-file "$work/pg1.port" --aws-trust-dir "$work/emu/aws-trust" --log-level warning 2>"$work/pg1.log" &
pg1_pid=$!
pids+=($pg1_pid)
pg1=https://127.0.0.1:$(wait_port "$work/pg1.port" "$work/pg1.log" "$pg1_pid")
"$bin/keygate-server" token create --state-dir "$work/pg1" --uses 10 >"$work/pg-token"
# The second replica shares the first's KEK and TLS certificate (a copy of
# its state folder) and the database.
cp -a "$work/pg1" "$work/pg2"
"$bin/keygate-server" serve --state-dir "$work/pg2" --config "$work/server.json" --listen 127.0.0.1:0 \
  --port-file "$work/pg2.port" --aws-trust-dir "$work/emu/aws-trust" --log-level warning 2>"$work/pg2.log" &
pg2_pid=$!
pids+=($pg2_pid)
pg2=https://127.0.0.1:$(wait_port "$work/pg2.port" "$work/pg2.log" "$pg2_pid")

# --- runs ----------------------------------------------------------------------
storm() { "$bin/keygate-boot-storm" "$@" --count "$count" --threads "$threads" 2>>"$work/errors.log"; }
kg=(keygate --url "$srv" --ca "$work/srv/ca.pem" --metadata-url "$emu" --token-file "$work/token"
    --server-pid "$srv_pid")
failed=0
{
  storm tls --url "https://127.0.0.1:$nginx_port" --ca "$work/nginx/ca.pem" --server-pid "$nginx_pid" \
    --label nginx-tls-only --mode closed --concurrency "$clients" --header || failed=1
  storm "${kg[@]}" --mode closed --concurrency "$clients" || failed=1
  for rate in $rates; do storm "${kg[@]}" --mode open --rate "$rate" || failed=1; done
  pg=(keygate --ca "$work/pg1/ca.pem" --metadata-url "$emu" --token-file "$work/pg-token" --db-pid "$pg_pid")
  pg_one=("${pg[@]}" --url "$pg1" --server-pid "$pg1_pid" --label keygate-pg)
  pg_two=("${pg[@]}" --url "$pg1" --url "$pg2" --server-pid "$pg1_pid" --server-pid "$pg2_pid" --label keygate-pg-x2)
  storm "${pg_one[@]}" --mode closed --concurrency "$clients" || failed=1
  for rate in $rates; do storm "${pg_one[@]}" --mode open --rate "$rate" || failed=1; done
  storm "${pg_two[@]}" --mode closed --concurrency "$clients" || failed=1
  for rate in $rates; do storm "${pg_two[@]}" --mode open --rate "$rate" || failed=1; done
  # tang's errors (past the generator's 10 s bound) are its result, not a failed run.
  storm tang --url "$tang" --mode closed --concurrency "$clients" || true
  for rate in $rates; do storm tang --url "$tang" --mode open --rate "$rate" || true; done
} >"$work/rows.tsv"

echo "Boot storm: $count unlocks per row, $(nproc) cores shared by the servers and the generator ($threads threads)"
echo "(kernel $(uname -r), tang $(dpkg-query -W -f='${Version}' tang), nginx $(dpkg-query -W -f='${Version}' nginx-light), OpenSSL $(openssl version | awk '{print $2}'))"
echo
column -t -s $'\t' "$work/rows.tsv"
if [ -s "$work/errors.log" ]; then
  echo
  echo "errors reported by the generator:"
  sort "$work/errors.log" | uniq -c | sort -rn | head -10
fi
exit "$failed"
