#!/usr/bin/env bash
# Fuzzes the frontend decoders and connection state machines with libFuzzer for SECONDS (default
# 300), starting from Tests/FuzzCorpus with the protocol dictionary Tests/FuzzCorpus.dict. New
# interesting inputs go to a scratch folder (KEEP=1 merges those that add coverage into the
# corpus); a crash input is copied into Tests/FuzzCorpus as crash-* and the script fails, so that
# the unit tests replay it from then on. swiftc keeps only the last -sanitize= it is given, so the
# Swift code gets both sanitizers in one flag (without it TidepoolCore had no coverage counters and
# libFuzzer saw only the C code of the dependencies).
#   scripts/fuzz.sh [SECONDS]
. "$(dirname "$0")/lib.sh"
cd "$TIDEPOOL_ROOT"

seconds="${1:-300}"
log "building the fuzz target (libFuzzer + AddressSanitizer)"
swift build --scratch-path .build-fuzz --sanitize=fuzzer --sanitize=address -Xswiftc -sanitize=fuzzer,address --product tidepool-fuzz 2>&1 | tail -2
work="$(mktemp -d /tmp/tidepool-fuzz.XXXXXX)"
mkdir -p "$work/new"
log "fuzzing for ${seconds}s"
status=0
# Swift's own crash backtracer reads the stack in a way AddressSanitizer reports as an error of its
# own, hiding the real crash: libFuzzer's report is enough.
SWIFT_BACKTRACE=enable=no .build-fuzz/debug/tidepool-fuzz -max_total_time="$seconds" -max_len=4096 -timeout=10 \
    -dict=Tests/FuzzCorpus.dict -artifact_prefix="$work/" "$work/new" Tests/FuzzCorpus >"$work/log" 2>&1 || status=$?
grep -E "INITED" "$work/log" | head -1
grep -E "DONE|^Done|ERROR|SUMMARY|crash-|timeout-" "$work/log" | tail -6
for crash in "$work"/crash-* "$work"/timeout-* "$work"/leak-*; do
    [ -e "$crash" ] || continue
    cp "$crash" "Tests/FuzzCorpus/$(basename "$crash")"
    log "kept $(basename "$crash") in Tests/FuzzCorpus: add it to git with the fix"
done
if [ "${KEEP:-0}" = 1 ]; then
    # Only the inputs that add coverage to what the corpus already reaches.
    SWIFT_BACKTRACE=enable=no .build-fuzz/debug/tidepool-fuzz -merge=1 Tests/FuzzCorpus "$work/new" >>"$work/log" 2>&1
    log "corpus: $(ls Tests/FuzzCorpus | wc -l) inputs"
fi
rm -rf "$work"
exit "$status"
