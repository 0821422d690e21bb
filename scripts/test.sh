#!/usr/bin/env bash
# Runs every test Tidepool has: the unit tests (no sockets), the style lint, and the integration
# tests that drive a real PostgreSQL through a running tidepool with psql, pgbench, psycopg and
# asyncpg. Installs what is missing (Debian packages, PyPI clients) and starts its own throwaway
# PostgreSQL, so it works on a fresh machine. Extra arguments go to pytest (e.g. -k cancel).
. "$(dirname "$0")/lib.sh"
cd "$TIDEPOOL_ROOT"

ensure_debian postgresql python3-pip openssl default-jdk-headless libpostgresql-jdbc-java libpg-query-dev libc-ares-dev \
    prometheus pgcli
ensure_python_clients
ensure_exporter
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log "building"
swift build 2>&1 | tail -3

log "unit tests"
swift test 2>&1 | tail -15

if [ "${CI:-}" = true ] || [ -n "${FUZZ_SECONDS:-}" ]; then
    log "fuzzing (bounded)"
    bash scripts/fuzz.sh "${FUZZ_SECONDS:-60}"
fi

log "style lint"
swift format lint --strict -r Sources Tests Package.swift

log "building (release, for the tests whose bounds are about speed)"
release_build
export TIDEPOOL_RELEASE_BIN="$TIDEPOOL_ROOT/.build/release/tidepool"

log "integration tests"
export TIDEPOOL_BIN="$TIDEPOOL_ROOT/.build/debug/tidepool"
python3 -m pytest tests/integration tests/differential -q -p no:cacheprovider "$@"
