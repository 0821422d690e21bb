/// Traffic counters of a database (or of one client between two hand-ins), as SHOW STATS reports
/// them. Times are in microseconds.
public struct TrafficStats: Sendable, Equatable {
    public var serverAssignments = 0
    public var transactions = 0
    public var queries = 0
    public var received = 0
    public var sent = 0
    public var transactionTime = 0
    public var queryTime = 0
    public var waitTime = 0
    public var clientParses = 0
    public var serverParses = 0
    public var binds = 0

    public init() {}

    var fields: [Int] {
        [
            serverAssignments, transactions, queries, received, sent, transactionTime, queryTime, waitTime,
            clientParses, serverParses, binds,
        ]
    }

    public static func + (a: TrafficStats, b: TrafficStats) -> TrafficStats {
        var s = a
        s.serverAssignments += b.serverAssignments
        s.transactions += b.transactions
        s.queries += b.queries
        s.received += b.received
        s.sent += b.sent
        s.transactionTime += b.transactionTime
        s.queryTime += b.queryTime
        s.waitTime += b.waitTime
        s.clientParses += b.clientParses
        s.serverParses += b.serverParses
        s.binds += b.binds
        return s
    }

    public static func - (a: TrafficStats, b: TrafficStats) -> TrafficStats {
        var negated = TrafficStats()
        negated.serverAssignments = -b.serverAssignments
        negated.transactions = -b.transactions
        negated.queries = -b.queries
        negated.received = -b.received
        negated.sent = -b.sent
        negated.transactionTime = -b.transactionTime
        negated.queryTime = -b.queryTime
        negated.waitTime = -b.waitTime
        negated.clientParses = -b.clientParses
        negated.serverParses = -b.serverParses
        negated.binds = -b.binds
        return a + negated
    }

    public var isZero: Bool { self == TrafficStats() }

    /// The averages PgBouncer shows for one stats period: counts and bytes per second, times per
    /// transaction, query and server assignment.
    public func averages(overSeconds seconds: Double) -> [Int] {
        let s = max(seconds, 0.001)
        func rate(_ v: Int) -> Int { Int((Double(v) / s).rounded()) }
        return [
            rate(serverAssignments), rate(transactions), rate(queries), rate(received), rate(sent),
            transactions > 0 ? transactionTime / transactions : 0, queries > 0 ? queryTime / queries : 0,
            serverAssignments > 0 ? waitTime / serverAssignments : 0, rate(clientParses), rate(serverParses),
            rate(binds),
        ]
    }
}

/// Totals per database and the difference over the last complete stats period.
extension TrafficStats {
    public static func += (a: inout TrafficStats, b: TrafficStats) { a = a + b }
}

public struct TrafficBook: Sendable {
    public private(set) var totals: [String: TrafficStats] = [:]
    private var atPeriodStart: [String: TrafficStats] = [:]
    public private(set) var lastPeriod: [String: TrafficStats] = [:]
    public private(set) var lastPeriodSeconds = 0.0

    public init() {}

    public mutating func add(_ stats: TrafficStats, database: String) {
        totals[database, default: TrafficStats()] += stats  // one lookup, in place
    }

    /// Replaces the totals with counts gathered elsewhere (the pooler's per-loop cells).
    public mutating func setTotals(_ totals: [String: TrafficStats]) {
        self.totals = totals
    }

    /// Closes a stats period that lasted `seconds`.
    public mutating func endPeriod(seconds: Double) {
        lastPeriod = [:]
        for (db, total) in totals { lastPeriod[db] = total - (atPeriodStart[db] ?? TrafficStats()) }
        atPeriodStart = totals
        lastPeriodSeconds = seconds
    }
}

extension AdminViews {
    static let statsNames = [
        "server_assignment_count", "xact_count", "query_count", "received", "sent", "xact_time", "query_time",
        "wait_time", "client_parse_count", "server_parse_count", "bind_count",
    ]

    /// SHOW STATS: totals since start, then averages over the last stats period.
    public static func stats(_ book: TrafficBook, databases: [String]) -> AdminResult {
        let averageNames = statsNames.map { $0 == "received" ? "avg_recv" : "avg_\($0)" }
        let columns = ["database"] + statsNames.map { "total_\($0)" } + averageNames
        let rows: [[String?]] = Set(databases).union(book.totals.keys).sorted().map { db in
            let total = book.totals[db] ?? TrafficStats()
            let average = (book.lastPeriod[db] ?? TrafficStats()).averages(overSeconds: book.lastPeriodSeconds)
            return [db] + (total.fields + average).map { "\($0)" }
        }
        return AdminResult(columns: columns, types: nameThenNumbers(columns.count), rows: rows)
    }

    static let totalsNames = statsNames.map {
        $0 == "received" ? "bytes_received" : $0 == "sent" ? "bytes_sent" : $0
    }

    /// SHOW STATS_TOTALS.
    public static func statsTotals(_ book: TrafficBook, databases: [String]) -> AdminResult {
        let rows: [[String?]] = Set(databases).union(book.totals.keys).sorted().map { db in
            [db] + (book.totals[db] ?? TrafficStats()).fields.map { "\($0)" }
        }
        return AdminResult(
            columns: ["database"] + totalsNames, types: nameThenNumbers(1 + totalsNames.count), rows: rows)
    }

    /// SHOW STATS_AVERAGES.
    public static func statsAverages(_ book: TrafficBook, databases: [String]) -> AdminResult {
        let rows: [[String?]] = Set(databases).union(book.totals.keys).sorted().map { db in
            [db] + (book.lastPeriod[db] ?? TrafficStats()).averages(overSeconds: book.lastPeriodSeconds).map { "\($0)" }
        }
        return AdminResult(
            columns: ["database"] + totalsNames, types: nameThenNumbers(1 + totalsNames.count), rows: rows)
    }

    /// SHOW TOTALS: the sums over all databases, one (name, value) row each.
    public static func totals(_ book: TrafficBook) -> AdminResult {
        let total = book.totals.values.reduce(TrafficStats(), +)
        let period = book.lastPeriod.values.reduce(TrafficStats(), +)
        let averages = period.averages(overSeconds: book.lastPeriodSeconds)
        var rows: [[String?]] = []
        for (i, name) in totalsNames.enumerated() { rows.append(["total_\(name)", "\(total.fields[i])"]) }
        for (i, name) in totalsNames.enumerated() { rows.append(["avg_\(name)", "\(averages[i])"]) }
        return AdminResult(columns: ["name", "value"], types: [.text, .numeric], rows: rows)
    }

    /// The types of `count` columns: a name, then statistics, which PgBouncer sends as numeric.
    static func nameThenNumbers(_ count: Int) -> [AdminResult.ColumnType] {
        [.text] + Array(repeating: .numeric, count: count - 1)
    }
}
