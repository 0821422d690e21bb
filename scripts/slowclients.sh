#!/usr/bin/env bash
# Memory and latency of Tidepool and PgBouncer with clients that do not read their results (issue
# 22's probe); records the table in BENCHMARKS.md (NO_RECORD=1: print only). Starts its own
# PostgreSQL, installs PgBouncer if missing, builds Tidepool in release mode.
. "$(dirname "$0")/lib.sh"
cd "$TIDEPOOL_ROOT"

ensure_debian postgresql pgbouncer
ensure_python_clients
release_script slowclients "$@"
