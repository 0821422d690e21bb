#!/usr/bin/env bash
# Counts the pooler's user-space instructions per transaction with callgrind: a figure that,
# unlike tps on a shared 2-core machine, does not move with noise, so a change to the hot path can
# be judged from one run. Starts its own PostgreSQL, builds the release binary, runs it (one
# event-loop thread) under valgrind, warms up, then counts a fixed pgbench workload.
#   scripts/instructions.sh [MODE]     MODE: simple, extended (default) or prepared
. "$(dirname "$0")/lib.sh"
cd "$TIDEPOOL_ROOT"

mode="${1:-extended}"
ensure_debian postgresql valgrind
log "building tidepool (release)"
release_build
work="$(mktemp -d /tmp/tidepool-instructions.XXXXXX)"
chmod 755 "$work"  # PostgreSQL runs as its own OS user below it
pg_port="$(free_port)"
port="$(free_port)"
cleanup() {
    [ -n "${vpid:-}" ] && kill "$vpid" 2>/dev/null && wait "$vpid" 2>/dev/null
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
INI
# valgrind cannot read the DWARF Swift emits; the symbol table is enough for function names.
strip --strip-debug -o "$work/tidepool" .build/release/tidepool
valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" "$work/tidepool" "$work/pooler.ini" \
    >"$work/valgrind.log" 2>&1 &
vpid=$!
for _ in $(seq 1 120); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.5; done
bench() { pgbench -h 127.0.0.1 -p "$port" -U postgres -n -c 5 -j 1 -t "$1" -S -M "$mode" postgres >/dev/null; }
bench 200
callgrind_control -z "$vpid" >/dev/null
bench 2000
callgrind_control -d "$vpid" >/dev/null
sleep 1
total="$(grep -h -E '^(summary|totals):' "$work"/callgrind.out* | awk '{print $2}' | sort -n | tail -1)"
echo "tidepool user-space instructions per transaction (pgbench -S -M $mode, 5 clients, 10,000 tx): $((total / 10000))"
