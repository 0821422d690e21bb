/// A histogram of durations in microseconds with fixed memory and about 3% precision
/// (HdrHistogram's idea: exact below 64, then 32 buckets per power of two), up to about 12 days.
public struct LatencyHistogram: Sendable, Equatable {
    static let linear = 64
    static let perOctave = 32
    static let maxExponent = 40
    static let bucketCount = linear + (maxExponent - 5) * perOctave
    /// Memory of one histogram once it holds a value.
    public static let byteSize = bucketCount * MemoryLayout<UInt64>.size

    private var counts: [UInt64] = []
    public private(set) var count: UInt64 = 0
    public private(set) var max: UInt64 = 0

    public init() {}

    static func index(of value: UInt64) -> Int {
        if value < UInt64(linear) { return Int(value) }
        let exponent = Swift.min(63 - value.leadingZeroBitCount, maxExponent - 1)
        let shift = exponent - 5
        let mantissa = Int(Swift.min(value >> UInt64(shift), 63))  // 32...63
        return linear + (exponent - 6) * perOctave + (mantissa - perOctave)
    }

    /// The largest value that falls in bucket `index`.
    static func upperBound(of index: Int) -> UInt64 {
        if index < linear { return UInt64(index) }
        let exponent = (index - linear) / perOctave + 6
        let mantissa = UInt64((index - linear) % perOctave + perOctave)
        let shift = UInt64(exponent - 5)
        return ((mantissa + 1) << shift) - 1
    }

    public mutating func record(_ microseconds: UInt64) {
        if counts.isEmpty { counts = Array(repeating: 0, count: Self.bucketCount) }
        counts[Self.index(of: microseconds)] += 1
        count += 1
        if microseconds > max { max = microseconds }
    }

    public mutating func merge(_ other: LatencyHistogram) {
        guard other.count > 0 else { return }
        if counts.isEmpty { counts = Array(repeating: 0, count: Self.bucketCount) }
        for i in 0..<other.counts.count { counts[i] += other.counts[i] }
        count += other.count
        if other.max > max { max = other.max }
    }

    /// The value at or below which `fraction` (0...1) of the recorded values fall, as the upper
    /// bound of its bucket (never above the largest value recorded); 0 when empty.
    public func percentile(_ fraction: Double) -> UInt64 {
        guard count > 0 else { return 0 }
        let rank = Swift.max(UInt64((fraction * Double(count)).rounded(.up)), 1)
        var seen: UInt64 = 0
        for (i, c) in counts.enumerated() where c > 0 {
            seen += c
            if seen >= rank { return Swift.min(Self.upperBound(of: i), max) }
        }
        return max
    }
}

/// Wait, transaction and query times of one database, since start and in the current and last
/// complete stats period.
public struct LatencySet: Sendable {
    public var wait = LatencyHistogram()
    public var transaction = LatencyHistogram()
    public var query = LatencyHistogram()

    public init() {}

    public enum Kind: Sendable { case wait, transaction, query }

    public mutating func record(_ kind: Kind, microseconds: UInt64) {
        switch kind {
        case .wait: wait.record(microseconds)
        case .transaction: transaction.record(microseconds)
        case .query: query.record(microseconds)
        }
    }

    public mutating func merge(_ other: LatencySet) {
        wait.merge(other.wait)
        transaction.merge(other.transaction)
        query.merge(other.query)
    }
}

/// The histograms of one database on one event loop, recorded into without hashing: a client
/// keeps a reference to its database's recorder. Touched only on its event loop.
public final class LatencyRecorder: @unchecked Sendable {
    /// The periods ended so far; `total` adds the current one. A value is recorded once, into
    /// `current`, and joins the earlier periods when its period ends.
    public private(set) var earlier = LatencySet()
    public private(set) var current = LatencySet()
    public private(set) var lastPeriod = LatencySet()

    public init() {}

    /// Everything recorded since start.
    public var total: LatencySet {
        var all = earlier
        all.merge(current)
        return all
    }

    public func record(_ kind: LatencySet.Kind, microseconds: UInt64) {
        current.record(kind, microseconds: microseconds)
    }

    public func endPeriod() {
        earlier.merge(current)
        lastPeriod = current
        current = LatencySet()
    }
}

/// Every loop's recorders merged, for SHOW LATENCY.
public struct LatencyBook: Sendable {
    public var total: [String: LatencySet] = [:]
    public var current: [String: LatencySet] = [:]
    public var lastPeriod: [String: LatencySet] = [:]

    public init() {}

    /// What one loop's recorders hold.
    public init(_ recorders: [String: LatencyRecorder]) {
        total = recorders.mapValues(\.total)
        current = recorders.mapValues(\.current)
        lastPeriod = recorders.mapValues(\.lastPeriod)
    }

    public mutating func merge(_ other: LatencyBook) {
        for (db, set) in other.total { total[db, default: LatencySet()].merge(set) }
        for (db, set) in other.current { current[db, default: LatencySet()].merge(set) }
        for (db, set) in other.lastPeriod { lastPeriod[db, default: LatencySet()].merge(set) }
    }
}

extension AdminViews {
    /// SHOW LATENCY (Tidepool's own): one row per database, kind and span, with percentiles in µs.
    public static func latency(_ book: LatencyBook) -> AdminResult {
        let columns = ["database", "kind", "span", "count", "p50_us", "p95_us", "p99_us", "max_us"]
        var rows: [[String?]] = []
        for db in Set(book.total.keys).sorted() {
            for (span, sets) in [("last_period", book.lastPeriod), ("total", book.total)] {
                let set = sets[db] ?? LatencySet()
                for (kind, h) in [("wait", set.wait), ("xact", set.transaction), ("query", set.query)] {
                    rows.append([
                        db, kind, span, "\(h.count)", "\(h.percentile(0.5))", "\(h.percentile(0.95))",
                        "\(h.percentile(0.99))", "\(h.max)",
                    ])
                }
            }
        }
        let types: [AdminResult.ColumnType] = [.text, .text, .text] + Array(repeating: .int8, count: 5)
        return AdminResult(columns: columns, types: types, rows: rows)
    }
}
