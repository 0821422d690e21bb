#!/usr/bin/env bash
# Fuzzes the frontend decoders and connection state machines with libFuzzer for SECONDS (default
# 300), starting from Tests/FuzzCorpus. New interesting inputs go to a scratch folder (KEEP=1 adds
# them to the corpus); a crash input is copied into Tests/FuzzCorpus as crash-* and the script
# fails, so that the unit tests replay it from then on.
#   scripts/fuzz.sh [SECONDS]
. "$(dirname "$0")/lib.sh"
cd "$TIDEPOOL_ROOT"

seconds="${1:-300}"
log "building the fuzz target (libFuzzer + AddressSanitizer)"
swift build --scratch-path .build-fuzz --sanitize=fuzzer --sanitize=address --product tidepool-fuzz 2>&1 | tail -2
work="$(mktemp -d /tmp/tidepool-fuzz.XXXXXX)"
mkdir -p "$work/new"
log "fuzzing for ${seconds}s"
status=0
.build-fuzz/debug/tidepool-fuzz -max_total_time="$seconds" -max_len=4096 -timeout=10 \
    -artifact_prefix="$work/" "$work/new" Tests/FuzzCorpus >"$work/log" 2>&1 || status=$?
grep -E "DONE|^Done|ERROR|SUMMARY|crash-|timeout-" "$work/log" | tail -6
for crash in "$work"/crash-* "$work"/timeout-* "$work"/leak-*; do
    [ -e "$crash" ] || continue
    cp "$crash" "Tests/FuzzCorpus/$(basename "$crash")"
    log "kept $(basename "$crash") in Tests/FuzzCorpus: add it to git with the fix"
done
if [ "${KEEP:-0}" = 1 ]; then cp -n "$work"/new/* Tests/FuzzCorpus/ 2>/dev/null || true; fi
rm -rf "$work"
exit "$status"
