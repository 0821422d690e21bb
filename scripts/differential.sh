#!/usr/bin/env bash
# The differential tester (tests/differential) for SECONDS per pool size (default 900) on random
# programs (SEED=n to start from one), against a throwaway PostgreSQL, directly and through
# Tidepool. The fixed, short run is part of scripts/test.sh.
#   scripts/differential.sh [SECONDS]
. "$(dirname "$0")/lib.sh"
cd "$TIDEPOOL_ROOT"

ensure_debian postgresql python3-pip libc-ares-dev
ensure_python_clients
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
swift build 2>&1 | tail -1
seed="${SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
log "differential programs for ${1:-900}s per pool size, seed $seed"
TIDEPOOL_BIN="$TIDEPOOL_ROOT/.build/debug/tidepool" DIFFERENTIAL_SECONDS="${1:-900}" DIFFERENTIAL_SEED="$seed" \
    python3 -m pytest tests/differential -q -s -p no:cacheprovider
