#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests (Debian's postgresql-15):
#   pg_cluster.sh start FILE   initdb in a new folder under /tmp, start the
#                              server on a Unix socket in that folder only (no
#                              TCP), write the folder's path to FILE
#   pg_cluster.sh stop FILE    stop it and remove the folder and FILE
# The server runs as the postgres user (PostgreSQL refuses root). ctest
# starts one for the whole run (fixture "pg"); a test that stops its
# database starts one of its own.
set -euo pipefail
bin=/usr/lib/postgresql/15/bin
action=${1:?usage: pg_cluster.sh start|stop FILE}
file=${2:?usage: pg_cluster.sh start|stop FILE}
case "$action" in
  start)
    # A cluster left by a run that was killed is stopped first.
    if [ -s "$file" ]; then "$0" stop "$file"; fi
    id postgres >/dev/null 2>&1 || { echo "pg_cluster: no postgres user (scripts/setup.sh installs postgresql)" >&2; exit 1; }
    dir=$(mktemp -d /tmp/keygate-pg.XXXXXX)
    chown postgres: "$dir"
    if ! runuser -u postgres -- "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync \
        >"$dir/initdb.log" 2>&1; then
      cat "$dir/initdb.log" >&2; rm -rf "$dir"; exit 1
    fi
    if ! runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-k $dir -c listen_addresses='' -c max_connections=400" start >/dev/null; then
      cat "$dir/server.log" >&2; rm -rf "$dir"; exit 1
    fi
    echo "$dir" >"$file"
    ;;
  stop)
    [ -s "$file" ] || { rm -f "$file"; exit 0; }
    dir=$(cat "$file")
    case "$dir" in /tmp/keygate-pg.*) ;; *) echo "pg_cluster: $file does not name a test cluster" >&2; exit 1 ;; esac
    runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -w -t 60 -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir" "$file"
    ;;
  *) echo "usage: pg_cluster.sh start|stop FILE" >&2; exit 2 ;;
esac
