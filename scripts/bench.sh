#!/usr/bin/env bash
# Benchmarks Tidepool against PgBouncer and direct PostgreSQL on this machine, and records the
# table in BENCHMARKS.md. Starts its own PostgreSQL (fsync off), installs PgBouncer if missing,
# builds Tidepool in release mode.
#   scripts/bench.sh                 full run (about 10 minutes)
#   DURATION=5 CLIENTS="20 200" scripts/bench.sh     shorter
#   THREADS=2                        Tidepool's event-loop threads (default: number of cores)
#   MODES="extended prepared"       pgbench protocols to run (default: simple extended prepared)
#   NO_RECORD=1                      print only, do not touch BENCHMARKS.md
. "$(dirname "$0")/lib.sh"
cd "$TIDEPOOL_ROOT"

ensure_debian postgresql pgbouncer
release_script bench "$@"
