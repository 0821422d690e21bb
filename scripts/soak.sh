#!/usr/bin/env bash
# Soak: mixed load (short, prepared and long transactions, a connection per transaction, admin
# commands) through Tidepool for DURATION seconds (default 1800), sampling RSS and open fds every
# 10 s. Fails unless memory stays within 5 % after warm-up, fds do not grow and no transaction
# fails. Appends the result to BENCHMARKS.md (NO_RECORD=1 to skip).
#   scripts/soak.sh [DURATION]
. "$(dirname "$0")/lib.sh"
cd "$TIDEPOOL_ROOT"

ensure_debian postgresql
release_script soak "$@"
