// libFuzzer entry point. Built for fuzzing with
//   swift build --scratch-path .build-fuzz --sanitize=fuzzer --sanitize=address -Xswiftc -sanitize=fuzzer,address --product tidepool-fuzz
// and run as `.build-fuzz/debug/tidepool-fuzz NEW_INPUTS_DIR Tests/FuzzCorpus` (see scripts/fuzz.sh).
// In a normal build this program does nothing; the unit tests replay the corpus through the same
// harness.
import TidepoolCore

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    FuzzHarness.run(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}
