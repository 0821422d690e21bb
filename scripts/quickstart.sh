#!/usr/bin/env bash
# Brings up a throwaway PostgreSQL plus Tidepool in front of it and prints a DATABASE_URL to try.
# Runs until Ctrl-C, then removes everything it made. Installs PostgreSQL if it is missing.
#   scripts/quickstart.sh [tidepool-port]      (default 6432)
. "$(dirname "$0")/lib.sh"
cd "$TIDEPOOL_ROOT"

ensure_debian postgresql
port="${1:-6432}"
work="$(mktemp -d /tmp/tidepool-quickstart.XXXXXX)"
chmod 755 "$work"  # the postgres OS user must reach its data directory inside
pg_port="$(free_port)"
stats_port="$(free_port)"

cleanup() {
    # Every step runs whatever the one before returned: a pooler already gone must not leave
    # PostgreSQL running.
    set +e
    if [ -n "${tidepool_pid:-}" ]; then
        kill "$tidepool_pid" 2>/dev/null
        wait "$tidepool_pid" 2>/dev/null
    fi
    stop_postgres "$work/pg"
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

log "building tidepool (release)"
release_build
log "starting PostgreSQL on 127.0.0.1:$pg_port"
start_postgres "$work/pg" "$pg_port"

cat >"$work/pooler.ini" <<INI
[databases]
* = host=127.0.0.1 port=$pg_port

[pooler]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir = $work
auth_type = trust
pool_mode = transaction
default_pool_size = 20
max_client_conn = 10000
; the admin console (psql .../pgbouncer) and /metrics, on loopback only
admin_users = postgres
stats_listen_addr = 127.0.0.1
stats_listen_port = $stats_port
logfile = $work/tidepool.log
INI

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
"$TIDEPOOL_ROOT/.build/release/tidepool" "$work/pooler.ini" &
tidepool_pid=$!
for _ in $(seq 1 100); do
    (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done

cat <<MSG

  Tidepool is up in transaction mode, pooling onto a throwaway PostgreSQL.

    DATABASE_URL=postgresql://postgres@127.0.0.1:$port/postgres

  Try:  psql "postgresql://postgres@127.0.0.1:$port/postgres" -c 'SELECT 1'
  Console:  psql "postgresql://postgres@127.0.0.1:$port/pgbouncer" -c 'SHOW POOLS'
  Metrics:  http://127.0.0.1:$stats_port/metrics
  Health:   http://127.0.0.1:$stats_port/health/ready
  Config: $work/pooler.ini   Log: $work/tidepool.log   Ctrl-C stops both and removes them.

MSG
wait "$tidepool_pid"
