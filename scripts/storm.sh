#!/usr/bin/env bash
# Connect storm: N clients (default 10,000) connect at once to Tidepool in front of a pool of 20,
# each logs in and runs a query, all stay connected until every one was served. Fails on any
# failure; appends the result to BENCHMARKS.md (NO_RECORD=1 to skip).
#   scripts/storm.sh [CLIENTS]
. "$(dirname "$0")/lib.sh"
cd "$TIDEPOOL_ROOT"

ensure_debian postgresql
release_script storm "$@"
