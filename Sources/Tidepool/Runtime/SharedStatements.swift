import NIOConcurrencyHelpers
import Synchronization

/// What the pooler's clients share about prepared statements: the names some server has accepted
/// (a client preparing one of these with Parse+Sync is answered without borrowing a server), the
/// stale-plan epoch (`PreparedStatementTracker.epoch`), and max_prepared_statements as SET or
/// RELOAD last made it (servers take it when next lent). Each client holds it directly: it is
/// read on every read and lend.
final class SharedStatements: Sendable {
    let capacity: Synchronization.Atomic<Int>
    /// Raised when a server reports a cached plan gone stale; read by every client before it
    /// sends statements.
    let epoch = Synchronization.Atomic<Int>(0)
    private let known = NIOLockedValueBox(Set<String>())

    init(capacity: Int) { self.capacity = Synchronization.Atomic(capacity) }

    func isKnown(_ name: String) -> Bool { known.withLockedValue { $0.contains(name) } }

    func accepted(_ names: [String]) {
        known.withLockedValue { known in
            if known.count < 100_000 { known.formUnion(names) }
        }
    }

    var knownCount: Int { known.withLockedValue { $0.count } }

    /// A server found a plan stale: every client parses its statements again.
    func planWentStale() -> Int { epoch.add(1, ordering: .relaxed).newValue }
}
