# Shared helpers for Tidepool's scripts. Source it: . "$(dirname "$0")/lib.sh"
set -euo pipefail

TIDEPOOL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '==> %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Installs the Debian packages named, when a command they provide is missing.
ensure_debian() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        case "$pkg" in
            postgresql) pg_bindir >/dev/null 2>&1 || missing+=(postgresql postgresql-contrib) ;;
            pgbouncer) command -v pgbouncer >/dev/null || missing+=(pgbouncer) ;;
            python3-pip) python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip) ;;
            *) dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg") ;;
        esac
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]}"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# Installs the Python clients the integration tests use: from PyPI, or Debian's packages where
# pip may not install into the system Python.
ensure_python_clients() {
    python3 -c 'import psycopg, asyncpg, pytest' 2>/dev/null && return 0
    log "installing psycopg, asyncpg and pytest"
    python3 -m pip install -q 'psycopg[binary]' asyncpg pytest 2>/dev/null ||
        python3 -m pip install -q --break-system-packages 'psycopg[binary]' asyncpg pytest 2>/dev/null || {
        ensure_debian python3-psycopg python3-asyncpg python3-pytest
    }
    python3 -c 'import psycopg, asyncpg, pytest'
}

# PyPI's prometheus-pgbouncer-exporter, which the console tests read Tidepool with. It pins a
# psycopg2 that no longer builds on current Pythons: a current psycopg2 is built from source
# (libpq-dev) and the exporter installed beside it.
ensure_exporter() {
    command -v pgbouncer-exporter >/dev/null && pgbouncer-exporter --help >/dev/null 2>&1 && return 0
    ensure_debian libpq-dev
    log "installing prometheus-pgbouncer-exporter"
    local pip=(python3 -m pip install -q)
    "${pip[@]}" psycopg2 prometheus_client python-json-logger PyYAML 2>/dev/null ||
        "${pip[@]}" --break-system-packages psycopg2 prometheus_client python-json-logger PyYAML
    "${pip[@]}" --no-deps prometheus-pgbouncer-exporter 2>/dev/null ||
        "${pip[@]}" --break-system-packages --no-deps prometheus-pgbouncer-exporter
}

# The newest installed PostgreSQL server's bin directory (initdb, postgres, pg_ctl, pgbench).
pg_bindir() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
    [ -n "$dir" ] && [ -x "$dir/initdb" ] || return 1
    echo "$dir"
}

# A free TCP port in [lo, hi), below the ephemeral range.
free_port() {
    python3 - "${1:-20000}" "${2:-30000}" <<'PY'
import random, socket, sys
lo, hi = int(sys.argv[1]), int(sys.argv[2])
for _ in range(200):
    p = random.randrange(lo, hi)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); s.close(); print(p); break
    except OSError:
        s.close()
PY
}

# Runs a shell command as the postgres OS user (initdb and postgres refuse root).
run_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi; }

# A directory for a cluster, owned by the postgres OS user.
pg_directory() {
    mkdir -p "$1"
    chmod 755 "$1"
    if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$1"; fi
}

# start_postgres DIR PORT [fsync on|off] [ADDRESS]: a throwaway cluster owned by the postgres OS
# user, listening on 127.0.0.1:PORT (and ADDRESS, trusting its subnet) and a Unix socket in DIR.
# Users: postgres (trust), app (SCRAM, password "app-secret"), md5user (md5, password "md5-secret").
start_postgres() {
    local dir="$1" port="$2" fsync="${3:-off}" address="${4:-}"
    local bin; bin="$(pg_bindir)"
    pg_directory "$dir"
    run_pg "'$bin/initdb' -D '$dir/data' -U postgres -A trust --no-sync >'$dir/initdb.log' 2>&1"
    cat >>"$dir/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1${address:+,$address}'
port = $port
unix_socket_directories = '$dir'
max_connections = 300
fsync = $fsync
synchronous_commit = off
full_page_writes = off
shared_buffers = 128MB
password_encryption = 'scram-sha-256'
wal_level = logical
CONF
    cat >"$dir/data/pg_hba.conf" <<HBA
local replication all trust
host replication all 127.0.0.1/32 trust
local all all trust
host all app 127.0.0.1/32 scram-sha-256
host all md5user 127.0.0.1/32 md5
host all all 127.0.0.1/32 trust
HBA
    if [ -n "$address" ]; then echo "host all all samenet trust" >>"$dir/data/pg_hba.conf"; fi
    run_pg "'$bin/pg_ctl' -D '$dir/data' -l '$dir/postgres.log' -w -t 60 start >/dev/null"
    "$bin/psql" -h "$dir" -p "$port" -U postgres -d postgres -qAt -v ON_ERROR_STOP=1 <<SQL >/dev/null
CREATE ROLE app LOGIN PASSWORD 'app-secret';
SET password_encryption = 'md5';
CREATE ROLE md5user LOGIN PASSWORD 'md5-secret';
CREATE DATABASE appdb OWNER app;
SQL
}

# A streaming standby of the primary on port $2, in directory $3, listening on address $4 (the
# same port on another loopback address lets one host list name both).
start_standby() {
    local primary_port="$1" dir="$2" address="$3" port="${4:-$1}"
    local bin; bin="$(pg_bindir)"
    pg_directory "$dir"
    run_pg "'$bin/pg_basebackup' -h 127.0.0.1 -p $primary_port -U postgres -D '$dir/data' -R -X stream -c fast --no-sync \
        >'$dir/basebackup.log' 2>&1"
    cat >>"$dir/data/postgresql.conf" <<CONF
listen_addresses = '$address'
port = $port
unix_socket_directories = '$dir'
CONF
    echo "host all all 127.0.0.0/8 trust" >>"$dir/data/pg_hba.conf"
    run_pg "'$bin/pg_ctl' -D '$dir/data' -l '$dir/postgres.log' -w -t 60 start >/dev/null"
}

stop_postgres() {
    local dir="$1"
    local bin; bin="$(pg_bindir)"
    if [ -f "$dir/data/postmaster.pid" ]; then
        if [ "$(id -u)" = 0 ]; then
            su postgres -s /bin/sh -c "'$bin/pg_ctl' -D '$dir/data' -m immediate stop" >/dev/null 2>&1 || true
        else
            "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
        fi
    fi
}

# The production build. Run-time exclusivity checks (which debug and test builds keep) cost about a
# tenth of the pooler's user-space instructions per transaction, in SwiftNIO as much as in Tidepool
# (callgrind, see BENCHMARKS.md), so release builds leave them out.
RELEASE_FLAGS=(-c release -Xswiftc -enforce-exclusivity=unchecked)
release_build() {
    ensure_debian libc-ares-dev
    swift build "${RELEASE_FLAGS[@]}" 2>&1 | tail -1
}

# Builds the release binary, raises the fd limit and runs scripts/NAME.py with the remaining
# arguments (bench, soak, storm).
release_script() {
    local name="$1"
    shift
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    log "building tidepool (release)"
    release_build
    exec python3 "$TIDEPOOL_ROOT/scripts/$name.py" "$@"
}
