#!/usr/bin/env bash
# Runs the SQL lexer against PostgreSQL's own scanner (libpg_query) for SECONDS (default 600) on
# generated SQL from a random seed (or SEED=n), longer than the fixed run of the unit tests.
#   scripts/lexer-oracle.sh [SECONDS]
. "$(dirname "$0")/lib.sh"
cd "$TIDEPOOL_ROOT"

ensure_debian libpg-query-dev
seed="${SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
log "lexer oracle for ${1:-600}s, seed $seed"
LEXER_ORACLE_SECONDS="${1:-600}" LEXER_ORACLE_SEED="$seed" \
    swift test --filter LexerOracleTests.tokensAgreeWithPostgreSQLsScanner 2>&1 |
    grep -E "lexer oracle:|disagree|PostgreSQL:|lexer:|passed after|failed after"
