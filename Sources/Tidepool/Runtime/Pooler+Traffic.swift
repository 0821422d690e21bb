import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Synchronization
import TidepoolCore

/// SHOW STATS counters and SHOW LATENCY histograms per event loop, the stats periods and log_stats.
extension Pooler {
    final class LoopLatency: @unchecked Sendable {
        var recorders: [String: LatencyRecorder] = [:]

        func recorder(for database: String) -> LatencyRecorder {
            if let r = recorders[database] { return r }
            let r = LatencyRecorder()
            recorders[database] = r
            return r
        }

        var book: LatencyBook { LatencyBook(recorders) }
    }

    /// A database's traffic counters on one event loop. Clients of that loop hand theirs in once
    /// per transaction under the cell's own lock, which only a reader ever contends for: no
    /// pooler-wide lock and no lookup by database name per transaction.
    final class TrafficCell: Sendable {
        let database: String
        private let stats = Mutex(TrafficStats())

        init(database: String) { self.database = database }

        func add(_ delta: TrafficStats) { stats.withLock { $0 += delta } }
        var value: TrafficStats { stats.withLock { $0 } }
    }

    struct TrafficCellKey: Hashable {
        var loop: Int
        var database: String
    }

    /// The cell a client of loop `loop` counts its traffic to `database` in (made on first use).
    func trafficCell(loop: Int, database: String) -> TrafficCell {
        trafficCells.withLockedValue { cells in
            let key = TrafficCellKey(loop: loop, database: database)
            if let cell = cells[key] { return cell }
            let cell = TrafficCell(database: database)
            cells[key] = cell
            return cell
        }
    }

    /// A console message and its answer, counted in the console's own SHOW STATS row.
    func countConsole(loop: Int, received: Int, sent: Int) {
        guard let name = AdminViews.consoleDatabase(config) else { return }
        trafficCell(loop: loop, database: name).add(AdminConsoleSession.traffic(received: received, sent: sent))
    }

    /// The traffic totals summed over the loops, with the stats periods.
    func trafficBook(endingPeriodAfter seconds: Double? = nil) -> TrafficBook {
        let cells = trafficCells.withLockedValue { Array($0.values) }
        var totals: [String: TrafficStats] = [:]
        for cell in cells { totals[cell.database, default: TrafficStats()] += cell.value }
        return traffic.withLockedValue { book in
            book.setTotals(totals)
            if let seconds { book.endPeriod(seconds: seconds) }
            return book
        }
    }

    /// Every loop's SHOW LATENCY histograms, merged (each read on its own loop).
    func latencyBook(on loop: EventLoop) -> EventLoopFuture<LatencyBook> {
        let books = loops.enumerated().map { index, l in l.submit { [self] in poolerLoops[index].latency.book } }
        return EventLoopFuture.whenAllSucceed(books, on: loop).map { books in
            var merged = LatencyBook()
            for book in books { merged.merge(book) }
            return merged
        }
    }

    /// Histograms allocated for SHOW LATENCY, roughly (three per database, span and loop).
    var latencyHistogramCount: Int {
        let databases = Set(trafficCells.withLockedValue { $0.keys.map(\.database) }).count
        return databases * 3 * 3 * loops.count
    }

    /// log_stats: one line per database with the last period's rates and averages.
    func logStats(_ book: TrafficBook) {
        for (database, delta) in book.lastPeriod.sorted(by: { $0.key < $1.key }) {
            let a = delta.averages(overSeconds: book.lastPeriodSeconds)
            let line =
                "stats: instance=\(instanceID) db=\(database) \(a[1]) xacts/s, \(a[2]) queries/s, in \(a[3]) B/s, "
                + "out \(a[4]) B/s, xact \(a[5]) us, query \(a[6]) us, wait \(a[7]) us"
            logger.info("\(line)")
        }
    }
}
