#!/usr/bin/env bash
# Counts the pooler's user-space instructions per transaction with callgrind: a figure that,
# unlike tps on a shared 2-core machine, does not move with noise, so a change to the hot path can
# be judged from one run. Starts its own PostgreSQL, builds the release binary, runs it (one
# event-loop thread) under valgrind, warms up, then counts a fixed pgbench workload.
#   scripts/instructions.sh [MODE]     MODE: simple, extended (default) or prepared
# Environment:
#   SETTINGS="max_prepared_statements = 0"   extra pooler.ini lines for Tidepool
#   PGBOUNCER=1                              also count PgBouncer's instructions for the same
#                                            workload (simple and extended only)
#   KEEP_PROFILE=DIR                         keep callgrind's output there (callgrind_annotate it)
. "$(dirname "$0")/lib.sh"
cd "$TIDEPOOL_ROOT"

mode="${1:-extended}"
ensure_debian postgresql valgrind
[ "${PGBOUNCER:-0}" = 1 ] && ensure_debian pgbouncer
log "building tidepool (release)"
release_build
work="$(mktemp -d /tmp/tidepool-instructions.XXXXXX)"
chmod 755 "$work"  # PostgreSQL (and PgBouncer) run as their own OS user below it
pg_port="$(free_port)"
port="$(free_port)"
cleanup() {
    # Every step runs whatever the one before returned: a failed kill must not leave PostgreSQL up.
    set +e
    if [ -n "${vpid:-}" ]; then
        kill "$vpid" 2>/dev/null
        wait "$vpid" 2>/dev/null
    fi
    pkill -f "pgbouncer $work/" 2>/dev/null
    if [ -n "${KEEP_PROFILE:-}" ]; then mkdir -p "$KEEP_PROFILE" && cp "$work"/callgrind.out* "$KEEP_PROFILE"/; fi
    stop_postgres "$work/pg"
    rm -rf "$work"
}
trap cleanup EXIT
start_postgres "$work/pg" "$pg_port"
"$(pg_bindir)/pgbench" -i -q -s 1 -h 127.0.0.1 -p "$pg_port" -U postgres postgres >/dev/null 2>&1
cat >"$work/pooler.ini" <<INI
[databases]
* = host=127.0.0.1 port=$pg_port
[pooler]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
default_pool_size = 20
threads = 1
logfile = $work/tidepool.log
${SETTINGS:-}
INI
wait_for_port() { for _ in $(seq 1 120); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.5; done; }
bench() { pgbench -h 127.0.0.1 -p "$1" -U postgres -n -c 5 -j 1 -t "$2" -S -M "$mode" postgres >/dev/null; }
total() { grep -h -E '^(summary|totals):' "$@" | awk '{print $2}' | sort -n | tail -1; }

# valgrind cannot read the DWARF Swift emits; the symbol table is enough for function names.
strip --strip-debug -o "$work/tidepool" .build/release/tidepool
valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" "$work/tidepool" "$work/pooler.ini" \
    >"$work/valgrind.log" 2>&1 &
vpid=$!
wait_for_port "$port"
bench "$port" 200
callgrind_control -z "$vpid" >/dev/null
bench "$port" 2000
callgrind_control -d "$vpid" >/dev/null
sleep 1
echo "tidepool user-space instructions per transaction (pgbench -S -M $mode, 5 clients, 10,000 tx):" \
    "$(($(total "$work"/callgrind.out*) / 10000))"
kill "$vpid" 2>/dev/null && wait "$vpid" 2>/dev/null
vpid=""

[ "${PGBOUNCER:-0}" = 1 ] || exit 0
# PgBouncer will not run as root, and callgrind_control cannot reach a process of another user, so
# it is counted over two runs, one with the measured transactions and one without, and subtracted.
bouncer_port="$(free_port)"
echo '"postgres" ""' >"$work/userlist.txt"
cat >"$work/pgbouncer.ini" <<INI
[databases]
postgres = host=127.0.0.1 port=$pg_port dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
unix_socket_dir =
auth_type = trust
auth_file = $work/userlist.txt
pool_mode = transaction
default_pool_size = 20
logfile = $work/pgbouncer.log
INI
touch "$work/pgbouncer.log"
chown postgres "$work/pgbouncer.log"
chmod 777 "$work"
bouncer_run() {
    rm -f "$work"/bouncer.out*
    su postgres -c "valgrind --tool=callgrind --callgrind-out-file=$work/bouncer.out pgbouncer $work/pgbouncer.ini" \
        >"$work/bouncer-valgrind.log" 2>&1 &
    wait_for_port "$bouncer_port"
    bench "$bouncer_port" 200
    [ "$1" -gt 0 ] && bench "$bouncer_port" "$1"
    pkill -TERM -f "pgbouncer $work/pgbouncer.ini"
    for _ in $(seq 1 60); do pgrep -f "pgbouncer $work/pgbouncer.ini" >/dev/null || break; sleep 0.5; done
    total "$work"/bouncer.out*
}
with="$(bouncer_run 2000)"
without="$(bouncer_run 0)"
echo "pgbouncer $(pgbouncer -V | head -1 | awk '{print $2}') user-space instructions per transaction (same workload):" \
    "$(((with - without) / 10000))"
