import Foundation
import Testing

@testable import TidepoolCore

/// Replays the fuzzing corpus (seeds, inputs libFuzzer found interesting, and any crash inputs) and
/// a batch of seeded random inputs through the fuzz harness: none may crash or hang.
@Suite struct FuzzCorpusTests {
    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("FuzzCorpus")

    @Test func corpusReplaysCleanly() throws {
        let files = try FileManager.default.contentsOfDirectory(atPath: Self.corpus.path).sorted()
        #expect(files.count >= 10)
        for name in files {
            let data = try Data(contentsOf: Self.corpus.appendingPathComponent(name))
            FuzzHarness.run(Array(data))
        }
    }

    @Test func randomInputsAndMutatedSeeds() throws {
        var rng = SplitMix64(seed: 0x7469_6465_706f_6f6c)
        let seeds = try FileManager.default.contentsOfDirectory(atPath: Self.corpus.path).map {
            Array(try Data(contentsOf: Self.corpus.appendingPathComponent($0)))
        }
        for i in 0..<3000 {
            var input: [UInt8]
            if i % 2 == 0, !seeds.isEmpty {
                input = seeds[Int(rng.next() % UInt64(seeds.count))]
                for _ in 0..<(1 + Int(rng.next() % 4)) where input.count > 1 {
                    input[1 + Int(rng.next() % UInt64(input.count - 1))] = UInt8(truncatingIfNeeded: rng.next())
                }
            } else {
                input = (0..<Int(rng.next() % 200)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            }
            FuzzHarness.run(input)
        }
    }
}
